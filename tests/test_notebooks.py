"""The tutorial notebooks: committed clean, and run end to end on the CPU with the built-in model.

Each notebook is executed with papermill (small parameters, DEVICE="cpu") and the numbers it
records in RESULTS_PATH are checked with scripts/check_notebooks.py, the same checks the T4
workflow runs on a GPU. A last test runs `pytest --nbval-lax` over the notebooks with their
default parameters, as a user's "Run all" would (on a copy, so nothing is written into notebooks/).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SMALL = {  # per notebook: parameters that keep a CPU run to seconds
    "01": {"NEW_TOKENS": 6},
    "02": {"N_REQUESTS": 3, "PROMPT_TOKENS": 24, "NEW_TOKENS": 8},
    "03": {"BATCH": 2, "PROMPT_TOKENS": 16, "NEW_TOKENS": 10},
    "04": {"N_REQUESTS": 4, "PROMPT_TOKENS": 24, "NEW_TOKENS": 8, "SWEEP": [1, 2]},
    "05": {"MAX_NEW_TOKENS": 24},
}


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_notebooks", REPO / "scripts" / "check_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_notebooks = _load_checker()


def test_every_notebook_is_there():
    assert [p.stem[:2] for p in NOTEBOOKS] == list(check_notebooks.NAMES)
    assert [p.stem for p in NOTEBOOKS] == list(check_notebooks.NAMES.values())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_with_parameters_and_badge(path):
    assert check_notebooks.check_clean(path) == []


@pytest.fixture(scope="session")
def python3_kernel():
    """A Jupyter kernel named python3 that runs this interpreter (ipykernel installs one; make sure)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       check=True)
    return "python3"


@pytest.fixture
def notebook_env(monkeypatch, smollm2_path, model_cache):
    """Kernels inherit this environment: the shared model cache (built already), no hub, quiet tokenizers."""
    monkeypatch.setenv("MISTRAL_T4_CACHE", str(model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu_and_records_results(path, tmp_path, python3_kernel, notebook_env):
    import papermill

    number = path.stem[:2]
    parameters = {"DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path / "out"),
                  "RESULTS_PATH": str(tmp_path / f"results_{number}.json"), **SMALL[number]}
    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=parameters,
                               kernel_name=python3_kernel, cwd=str(tmp_path), progress_bar=False)
    assert check_notebooks.check_results(tmp_path, numbers=[number]) == []
    results = json.loads((tmp_path / f"results_{number}.json").read_text())
    if number == "02":
        assert results["static_equals_dynamic"] and results["identical_requests"] == 3
    if number == "04":
        assert set(results["engines"]) == {"mistral_t4", "hf-dynamic", "hf-static"}
        assert [point["batch"] for point in results["sweep"]] == [1, 2]
    if number == "05":
        assert "Paris" in results["answer"]


@pytest.mark.slow
def test_nbval_runs_every_notebook_with_its_defaults(tmp_path, python3_kernel, notebook_env):
    """`pytest --nbval-lax notebooks/`: what a user's Run all does on a CPU (defaults must stay small)."""
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("outputs"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp_path), "notebooks"],
        cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy(),
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert check_notebooks.check_results(tmp_path / "notebooks" / "outputs") == []
