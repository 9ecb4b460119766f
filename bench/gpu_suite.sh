#!/usr/bin/env bash
# The full GPU benchmark suite in one call, on the Mistral-7B shape with random weights:
# notebook 04 run top to bottom (W32 vs the HF baselines under the 15 GiB T4 budget, batch
# sweep, batch-1 latency, JSON + PNG plots), then the correctness check of bench/gpu_check.py.
#   OUT=out bash bench/gpu_suite.sh
# On machines without Jupyter the notebook runs through scripts/run_notebook.py.
# SKIP_CHECK=1 leaves the correctness check out; T4_CODE=1 adds it once more with the CUDA NF4 kernels built as a T4's
# (PTX for compute_75, the T4's plans; kernels.nf4_race then picks the T4 path's backend on this card), in $OUT/t4_code.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-out}")
mkdir -p "$OUT/nb04"
python3 scripts/run_notebook.py notebooks/04_benchmark_32.ipynb \
  -p MODEL random-7b -p MEMORY_CAP_GIB 15 \
  -p ENGINES '["mistral_t4", "hf-dynamic", "hf-static", "hf-fp16"]' \
  -p SWEEP '[1, 8, 16, 32, 64, 128]' -p BATCH1_TOKENS 256 \
  -p OUTPUT_DIR "$OUT/nb04" -p RESULTS_PATH "$OUT/nb04/results_04.json"
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  python3 bench/gpu_check.py --quants nf4,fp16 --out "$OUT"
fi
if [ "${T4_CODE:-0}" = 1 ]; then
  MISTRAL_T4_NF4_CUDA_ARCH=compute_75 python3 bench/gpu_check.py --quants nf4 --out "$OUT/t4_code"
fi
