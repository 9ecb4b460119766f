"""The GitHub workflows: valid against the github-workflows schema (vendored in check-jsonschema,
so this runs offline), and doing what they are for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

WORKFLOWS = REPO / ".github" / "workflows"
FILES = ["ci.yml", "notebooks-t4.yml"]


def _check_jsonschema() -> list[str]:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("check-jsonschema")
    if found is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    return [found]


def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as the boolean True
    if True in data:
        data["on"] = data.pop(True)
    return data


@pytest.mark.parametrize("name", FILES)
def test_workflow_matches_the_github_schema(name):
    run = subprocess.run([*_check_jsonschema(), "--builtin-schema", "vendor.github-workflows",
                          str(WORKFLOWS / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("name: broken\non: push\njobs:\n  test:\n    runs-on: ubuntu-latest\n    stepz: []\n")
    run = subprocess.run([*_check_jsonschema(), "--builtin-schema", "vendor.github-workflows", str(broken)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "stepz" in run.stdout


def _steps(job: dict) -> list[dict]:
    steps = job.get("steps")
    assert steps and all(isinstance(step, dict) and ("run" in step or "uses" in step) for step in steps)
    return steps


def test_ci_runs_the_repository_entry_point_on_python_311():
    ci = _load("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = _steps(job)
    assert any(s.get("uses", "").startswith("actions/checkout@") for s in steps)
    python = [s for s in steps if s.get("uses", "").startswith("actions/setup-python@")]
    assert python and str(python[0]["with"]["python-version"]) == "3.11"
    assert [s["run"].strip() for s in steps if "run" in s] == ["bash .ci/run"]
    assert (REPO / ".ci" / "run").is_file()


def test_t4_workflow_runs_every_notebook_on_the_t4_runner_and_uploads_artifacts():
    t4 = _load("notebooks-t4.yml")
    assert "workflow_dispatch" in t4["on"] and t4["on"]["schedule"][0]["cron"]
    (job,) = t4["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu", "t4"]
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert "mistralai/Mistral-7B-Instruct-v0.2" in job["env"]["MODEL"]
    steps = _steps(job)
    script = "\n".join(s.get("run", "") for s in steps)
    assert "papermill" in script and "notebooks/0*.ipynb" in script
    assert "-p RESULTS_PATH" in script and "-p OUTPUT_DIR" in script and "-p MODEL" in script
    assert "scripts/check_notebooks.py results" in script and (REPO / "scripts" / "check_notebooks.py").is_file()
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and upload[0].get("if") == "always()" and upload[0]["with"]["path"]
