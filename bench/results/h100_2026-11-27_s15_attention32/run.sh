#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
probe() {  # label splits block
  rm -rf /tmp/ind; SPLITS=$2 BLOCK_L=$3 TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$PWD/src timeout 100 python3 .probe/att32.py $1 sm90 32 > $OUT/probe_$1.log 2>&1
  echo "$1 splits=$2 block=$3 $(grep -oE '"replay_ms": \[[^]]*\], "replay_ms_min": [0-9.]+' $OUT/probe_$1.log) $(grep -E 'Error|Traceback' $OUT/probe_$1.log | tail -1)" | tee -a $OUT/ab.txt
  grep KERNELS $OUT/probe_$1.log | grep -oE '"_decode_attention_kernel": \[[^]]*\]|"_combine_splits_kernel": \[[^]]*\]' | tr '\n' ' ' | tee -a $OUT/ab.txt; echo | tee -a $OUT/ab.txt
}
probe base "" ""; probe s2 2 ""; probe s3 3 ""; probe b32 "" 32; probe b32s2 2 32; probe base2 "" ""
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch, glob
x = torch.load('/tmp/logits_base_sm90_32.pt').float()
for f in sorted(glob.glob('/tmp/logits_*_sm90_32.pt')):
    y = torch.load(f).float(); print(f, torch.equal(x, y), (x - y).abs().max().item())
" 2>&1 | tee -a $OUT/ab.txt
