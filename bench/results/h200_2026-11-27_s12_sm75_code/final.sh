#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD/src
timeout 300 python3 bench/gpu_check.py --quants nf4 --out $OUT 2>&1 | grep -E "^nf4 " | cut -c1-600
export MISTRAL_T4_NF4_CUDA_ARCH=compute_75
rm -rf /tmp/indt4; TORCHINDUCTOR_CACHE_DIR=/tmp/indt4 timeout 200 taskset -c 0,1 python3 .probe/regions.py t4code t4 32 2>&1 | grep -E "RESULT|Error|error" | tail -3 | tee $OUT/regions_t4code_2cpus.txt
