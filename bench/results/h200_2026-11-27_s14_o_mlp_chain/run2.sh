#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
probe() {  # label rows chain
  rm -rf /tmp/ind
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind MISTRAL_T4_O_MLP_CHAIN=$3 PYTHONPATH=/tmp/site:$PWD/src timeout 100 python3 .probe/regions.py $1 sm90 $2 > $OUT/probe_$1_$2.log 2>&1
  grep -E "RESULT|Error|error|Traceback" $OUT/probe_$1_$2.log | tail -3 | sed -E 's/"choice".*"warmup_s"/"warmup_s"/' | tee -a $OUT/ab.txt
}
probe apart 1 0; probe chain 1 1; probe chain 16 1; probe apart 16 0; probe apart2 1 0; probe chain2 1 1
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch
for a, b in [('apart_sm90_1', 'chain_sm90_1'), ('apart_sm90_16', 'chain_sm90_16')]:
    try:
        x, y = torch.load(f'/tmp/logits_{a}.pt'), torch.load(f'/tmp/logits_{b}.pt')
        print(a, b, 'logits equal', torch.equal(x, y), (x - y).abs().max().item())
    except Exception as e: print(a, b, e)
" 2>&1 | tee -a $OUT/ab.txt
grep -h KERNELS $OUT/probe_chain_1.log $OUT/probe_apart_1.log | cut -c1-1500
