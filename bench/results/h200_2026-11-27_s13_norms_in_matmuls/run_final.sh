#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
PYTHONPATH=/tmp/site:$PWD/src timeout 60 python3 bench/gpu_kernels.py --only norm_fold > $OUT/norm_fold.log 2>&1
grep -c "residual_equal=True xw_equal=True" $OUT/norm_fold.log; grep -E "False|rror" $OUT/norm_fold.log | head -5
grep -E "split_k=None" $OUT/norm_fold.log | grep -E "m=(1|16) " | sed -E 's/residual_equal=True xw_equal=True sums_rel_err=0 counters_zero=True //; s/scaled_counters_zero=True //'
probe() {  # label src rows
  rm -rf /tmp/ind; export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
  PYTHONPATH=/tmp/site:$2 timeout 90 python3 .probe/regions.py $1 sm90 $3 2>&1 | grep -E "RESULT|Error|error|Traceback" | tail -3 | sed -E 's/"choice".*"warmup_s"/"warmup_s"/' | tee -a $OUT/ab.txt
}
probe prev .probe/prev/src 1; probe new $PWD/src 1
export PYTHONPATH=/tmp/site:$PWD/src; unset TORCHINDUCTOR_CACHE_DIR
SKIP_CHECK=1 OUT=/tmp/suite timeout 190 bash bench/gpu_suite.sh > $OUT/suite.log 2>&1; echo "suite rc $?"
cp /tmp/suite/nb04/*.json $OUT/ 2>/dev/null; cp /tmp/suite/nb04/*.png $OUT/ 2>/dev/null
grep -E "floor:|sweep batch .*peak|batch 1:|^mistral_t4|^hf-" $OUT/suite.log | tail -14
probe new $PWD/src 16; probe prev .probe/prev/src 16
