"""Run a notebook's code cells in order in this Python process, with parameters overridden.

    python scripts/run_notebook.py notebooks/04_benchmark_32.ipynb -p MODEL random-7b -p MEMORY_CAP_GIB 15

For machines without Jupyter (the GPU machines used for benchmarks have no papermill or
ipykernel): values given with -p (Python literals, or plain strings) are assigned right
after the cell tagged `parameters`, as papermill does. IPython magics and shell lines
(`%...`, `!...`) are skipped; everything else runs unchanged, so the notebook writes its
own outputs (JSON, PNGs) where its parameters say. Exits non-zero if a cell raises.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def cell_code(cell: dict) -> str:
    lines = "".join(cell["source"]).splitlines()
    kept = [line if not line.lstrip().startswith(("%", "!")) else line[: len(line) - len(line.lstrip())] + "pass"
            for line in lines]
    return "\n".join(kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args()
    with open(args.notebook) as f:
        notebook = json.load(f)
    overrides = {name: parse_value(value) for name, value in args.p}
    os.chdir(os.path.dirname(os.path.abspath(args.notebook)))
    namespace = {"__name__": "__main__", "display": print}
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for index, cell in enumerate(cells):
        start = time.perf_counter()
        print(f"--- cell {index + 1}/{len(cells)}", flush=True)
        exec(compile(cell_code(cell), f"{args.notebook}:cell{index + 1}", "exec"), namespace)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            namespace.update(overrides)
            print(f"parameters overridden: {overrides}", flush=True)
        print(f"--- cell {index + 1} done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
