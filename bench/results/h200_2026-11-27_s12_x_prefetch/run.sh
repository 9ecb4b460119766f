#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
run() {  # label src
  export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$1
  PYTHONPATH=/tmp/site:$2 timeout 150 python3 .probe/regions.py $1 sm90 32 2>&1 | grep -E "RESULT|Error|error" | tail -2 | cut -c1-400 | tee -a $OUT/xpre.txt
}
run new src; run prev .probe/prev/src; run new src; run prev .probe/prev/src
PYTHONPATH=/tmp/site:$PWD/src OUT=$OUT timeout 200 python3 bench/gpu_kernels.py --only nf4,swiglu > $OUT/gpu_kernels_xpre.log 2>&1
echo "gpu_kernels rc=$?"; grep -E "M=32 |M=1 |M=8 " $OUT/gpu_kernels_xpre.log | cut -c1-140
grep -E "split" $OUT/gpu_kernels_xpre.log | grep "M=32\|M=24" | cut -c1-160
