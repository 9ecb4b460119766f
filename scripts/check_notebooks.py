"""Check the tutorial notebooks: committed clean, and what an executed run recorded.

    python scripts/check_notebooks.py clean [NOTEBOOK ...]    # default: notebooks/*.ipynb
    python scripts/check_notebooks.py results DIR             # DIR holds results_01.json ... results_05.json

`clean`: no outputs, no execution counts, no widget state; one cell tagged `parameters`; a
Colab badge pointing at the notebook itself; an install cell that only acts on Colab.
`results`: the numbers each notebook writes to RESULTS_PATH (tests/test_notebooks.py and the
T4 workflow assert with the same functions). Exit status 1 and one line per problem on failure.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
COLAB_URL = "https://colab.research.google.com/github/mistral-t4/mistral_t4/blob/main/notebooks/{name}"
NAMES = {
    "01": "01_quantized_loading", "02": "02_static_cache", "03": "03_compilation",
    "04": "04_benchmark_32", "05": "05_chat_panel",
}


def check_clean(path: pathlib.Path) -> list[str]:
    """Problems with a notebook as committed (empty when it is fine)."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as error:
        problems.append(f"not a valid notebook: {error.message}")
    if "widgets" in nb.metadata:
        problems.append("widget state in the notebook metadata")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for i, cell in enumerate(code):
        if cell.get("outputs"):
            problems.append(f"code cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"code cell {i} has an execution count")
        if "widgets" in cell.metadata or "execution" in cell.metadata:
            problems.append(f"code cell {i} has execution or widget metadata")
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    if len(tagged) != 1 or tagged[0].cell_type != "code":
        problems.append(f"expected one code cell tagged 'parameters', found {len(tagged)}")
    else:
        names = [line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line]
        lower = [name for name in names if name != name.upper()]
        if lower:
            problems.append(f"parameters not in UPPER_CASE: {lower}")
        if "RESULTS_PATH" not in names:
            problems.append("no RESULTS_PATH parameter")
    first = nb.cells[0].source if nb.cells else ""
    if not first.startswith("# ") or COLAB_URL.format(name=path.name) not in first:
        problems.append(f"the first cell needs a title and a Colab badge linking to {COLAB_URL.format(name=path.name)}")
    if "What you will learn" not in first:
        problems.append("the first cell has no 'What you will learn'")
    install = [cell for cell in code if "pip install" in cell.source]
    if not install or any('if "google.colab" in sys.modules:' not in cell.source for cell in install):
        problems.append("pip install must only run on Colab (inside `if \"google.colab\" in sys.modules:`)")
    if any(re.search(r"pip install[^\n]*\btorch\b", cell.source) for cell in install):
        problems.append("the install cell must not reinstall torch")
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("kernelspec must be python3")
    return problems


def check_results(directory: pathlib.Path, numbers=tuple(NAMES)) -> list[str]:
    """Problems with what the notebooks `numbers` recorded in `directory` (empty when all is fine)."""
    problems = []
    for number in numbers:
        path = pathlib.Path(directory) / f"results_{number}.json"
        if not path.is_file():
            problems.append(f"{NAMES[number]}: no {path}")
            continue
        results = json.loads(path.read_text())
        problems += [f"{NAMES[number]}: {p}" for p in CHECKS[number](results)]
    return problems


def _check_01(r: dict) -> list[str]:
    problems = []
    if not r.get("tokens_generated", 0) > 0:
        problems.append("no tokens generated")
    if len(r.get("nf4_codes", [])) != 16 or r.get("nf4_blocksize") != 64 or not r.get("double_quant"):
        problems.append("expected 16 NF4 codes, blocks of 64, double quantization")
    if not r.get("weight_bytes", {}).get("nf4", 0) > 0:
        problems.append("NF4 size not measured")
    if r.get("adapter_built") and not r.get("adapter_tokens_equal_base"):
        problems.append("an untrained adapter (B = 0) changed the tokens")
    return problems


def _check_02(r: dict) -> list[str]:
    problems = []
    if not r.get("tokens_generated", 0) > 0:
        problems.append("no tokens generated")
    if r.get("cache_len", 1) % 128:
        problems.append(f"cache length {r.get('cache_len')} is not a multiple of 128")
    if r.get("device") == "cpu" and not r.get("static_equals_dynamic"):
        problems.append(f"static-cache tokens differ from dynamic-cache tokens in fp32 on the CPU "
                        f"({r.get('identical_requests')} of {r.get('requests')} identical)")
    if r.get("device") != "cpu" and not r.get("identical_requests", 0) > 0:
        problems.append("no request produced the same tokens with both caches")
    return problems


def _check_03(r: dict) -> list[str]:
    problems = []
    if not r.get("tokens_generated", 0) > 0 or not r.get("eager_step_ms", 0) > 0:
        problems.append("no decode steps timed")
    if r.get("compile") and not r.get("compiled_step_ms", 0) > 0:
        problems.append("compiled steps were not timed")
    return problems


def _check_04(r: dict) -> list[str]:
    problems = []
    engines = r.get("engines", {})
    if not engines:
        problems.append("no engines in the benchmark")
    for name, e in engines.items():
        if "skipped" in e:
            continue
        if e.get("requests_ok") != e.get("requests_total") or not e.get("requests_total"):
            problems.append(f"{name}: {e.get('requests_ok')} of {e.get('requests_total')} requests ok")
        if not (e.get("output_tokens_per_s") or 0) > 0:
            problems.append(f"{name}: output_tokens_per_s is {e.get('output_tokens_per_s')}")
    for path in [r.get("json_path"), *r.get("plots", [])]:
        if not path or not pathlib.Path(path).is_file():
            problems.append(f"missing output file {path}")
    return problems


def _check_05(r: dict) -> list[str]:
    answer = r.get("answer") or ""
    problems = [] if "Paris" in answer else [f"the answer does not mention Paris: {answer!r}"]
    if r.get("error"):
        problems.append(f"the chat turn failed: {r['error']}")
    return problems


CHECKS = {"01": _check_01, "02": _check_02, "03": _check_03, "04": _check_04, "05": _check_05}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("clean", "results") or (argv[0] == "results" and len(argv) != 2):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "clean":
        paths = [pathlib.Path(p) for p in argv[1:]] or sorted(NOTEBOOKS.glob("*.ipynb"))
        problems = [f"{path.name}: {p}" for path in paths for p in check_clean(path)]
    else:
        problems = check_results(pathlib.Path(argv[1]))
    for problem in problems:
        print(problem)
    if not problems:
        print("ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
