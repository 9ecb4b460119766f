#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/card.txt
probe() {  # label src rows
  rm -rf /tmp/ind; TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$2 timeout 100 python3 .probe/regions.py $1 sm90 $3 > $OUT/probe_$1_$3.log 2>&1
  echo "$1 rows=$3 $(grep -oE '"replay_ms": \[[^]]*\], "replay_ms_min": [0-9.]+' $OUT/probe_$1_$3.log) $(grep -E 'Error|Traceback' $OUT/probe_$1_$3.log | tail -1)" | tee -a $OUT/ab.txt
  grep KERNELS $OUT/probe_$1_$3.log | grep -oE '"nf4_matmul32": \[[^]]*\]' | tee -a $OUT/ab.txt
}
probe base $PWD/src 32; probe r3 .probe/vr3/src 32; probe r2 .probe/vr2/src 32
probe base2 $PWD/src 32; probe r32 .probe/vr3/src 32; probe r22 .probe/vr2/src 32
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch, glob
x = torch.load('/tmp/logits_base_sm90_32.pt').float()
for f in sorted(glob.glob('/tmp/logits_*_sm90_32.pt')):
    y = torch.load(f).float()
    print(f, 'equal', torch.equal(x, y), 'max|diff|', (x - y).abs().max().item(), 'argmax same', (x.argmax(-1) == y.argmax(-1)).float().mean().item())
" 2>&1 | tee -a $OUT/ab.txt
