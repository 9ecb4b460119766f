#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
probe() {  # label rings
  rm -rf /tmp/ind; RINGS=$2 TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$PWD/src timeout 100 python3 .probe/rings.py $1 sm90 32 > $OUT/probe_$1.log 2>&1
  echo "$1 rings=$2 $(grep -oE '"replay_ms": \[[^]]*\], "replay_ms_min": [0-9.]+' $OUT/probe_$1.log) $(grep -E 'Error|Traceback' $OUT/probe_$1.log | tail -1)" | tee -a $OUT/ab.txt
}
probe base ""; probe w3 "nf4_matmul32w=3"; probe n5 "nf4_matmul32=5"; probe both "nf4_matmul32w=3,nf4_matmul32=5"; probe base2 ""
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch, glob
x = torch.load('/tmp/logits_base_sm90_32.pt')
for f in sorted(glob.glob('/tmp/logits_*_sm90_32.pt')): print(f, torch.equal(x, torch.load(f)))
" 2>&1 | tee -a $OUT/ab.txt
