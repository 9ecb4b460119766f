#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=/tmp/site:$PWD/src timeout 150 python3 bench/gpu_kernels.py --only attention > $OUT/attention_new.log 2>&1; echo "attention rc $?"
grep -viE "^\{|warn" $OUT/attention_new.log | head -40
PYTHONPATH=/tmp/site:$PWD/.probe/prev/src timeout 150 python3 bench/gpu_kernels.py --only attention > $OUT/attention_prev.log 2>&1; echo "attention prev rc $?"
probe() {  # label src rows
  rm -rf /tmp/ind; TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$2 timeout 100 python3 .probe/regions.py $1 sm90 $3 > $OUT/probe_$1_$3.log 2>&1
  grep -E "RESULT|Error|Traceback" $OUT/probe_$1_$3.log | tail -2 | sed -E 's/"choice".*"warmup_s"/"warmup_s"/' | tee -a $OUT/ab.txt
}
probe prev .probe/prev/src 32; probe new $PWD/src 32; probe new $PWD/src 1; probe prev .probe/prev/src 1
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch
for r in (1, 32):
    x, y = torch.load(f'/tmp/logits_prev_sm90_{r}.pt'), torch.load(f'/tmp/logits_new_sm90_{r}.pt')
    print(r, 'logits equal', torch.equal(x, y), (x - y).abs().max().item())
" 2>&1 | tee -a $OUT/ab.txt
