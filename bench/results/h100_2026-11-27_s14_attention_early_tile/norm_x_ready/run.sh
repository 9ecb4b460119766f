#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
probe() {  # label src rows
  rm -rf /tmp/ind; TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$2 timeout 90 python3 .probe/regions.py $1 sm90 $3 > $OUT/probe_$1_$3.log 2>&1
  grep -E "RESULT|Error|Traceback" $OUT/probe_$1_$3.log | tail -2 | sed -E 's/"choice".*"warmup_s"/"warmup_s"/' | tee -a $OUT/ab.txt
}
probe prev .probe/prev/src 32; probe new $PWD/src 32; probe new2 $PWD/src 32; probe prev2 .probe/prev/src 32
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch
x, y = torch.load('/tmp/logits_prev_sm90_32.pt'), torch.load('/tmp/logits_new_sm90_32.pt')
print('32 logits equal', torch.equal(x, y), (x - y).abs().max().item())
" 2>&1 | tee -a $OUT/ab.txt
export PYTHONPATH=/tmp/site:$PWD/src; unset TORCHINDUCTOR_CACHE_DIR
SKIP_CHECK=1 OUT=/tmp/suite timeout 240 bash bench/gpu_suite.sh > $OUT/suite.log 2>&1; echo "suite rc $?"
cp /tmp/suite/nb04/*.json $OUT/ 2>/dev/null; cp /tmp/suite/nb04/*.png $OUT/ 2>/dev/null
grep -E "floor:|sweep batch .*peak|batch 1:|^mistral_t4|^hf-" $OUT/suite.log | tail -14
