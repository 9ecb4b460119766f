#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD/src
export MISTRAL_T4_NF4_CUDA_ARCH=compute_75
for rows in 32 1; do
  timeout 150 python3 .probe/regions.py t4code t4 $rows 2>&1 | grep -E "RESULT|KERNELS|Error|error" | tail -4 | tee -a $OUT/regions_t4code.txt
done
timeout 240 python3 bench/gpu_check.py --quants nf4 --out $OUT/check75 2>&1 | grep -E "^nf4 " | cut -c1-700
