#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
PYTHONPATH=/tmp/site:$PWD/src timeout 90 python3 bench/gpu_kernels.py --only norm_fold > $OUT/norm_fold.log 2>&1
echo "residual equal: $(grep -c 'residual_equal=True xw_equal=True sums_rel_err=0 counters_zero=True' $OUT/norm_fold.log) of $(grep -c 'residual_equal' $OUT/norm_fold.log)" | tee -a $OUT/ab.txt; grep -E "False|rror" $OUT/norm_fold.log | head -3
probe() {  # label src rows
  rm -rf /tmp/ind; TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$2 timeout 90 python3 .probe/regions.py $1 sm90 $3 > $OUT/probe_$1_$3.log 2>&1
  echo "$1 rows=$3 $(grep -oE '"replay_ms": \[[^]]*\], "replay_ms_min": [0-9.]+' $OUT/probe_$1_$3.log) $(grep -E 'Error|Traceback' $OUT/probe_$1_$3.log | tail -1)" | tee -a $OUT/ab.txt
}
probe prev .probe/prev/src 16; probe new $PWD/src 16; probe prev2 .probe/prev/src 16; probe new2 $PWD/src 16; probe new $PWD/src 1
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch
x, y = torch.load('/tmp/logits_prev_sm90_16.pt'), torch.load('/tmp/logits_new_sm90_16.pt')
print('16 rows logits equal', torch.equal(x, y))
" 2>&1 | tee -a $OUT/ab.txt
