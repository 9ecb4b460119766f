#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
probe() {  # label src rows ahead
  rm -rf /tmp/ind; AHEAD=$4 TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$2 timeout 100 python3 .probe/ahead.py $1 sm90 $3 > $OUT/probe_$1_$3.log 2>&1
  echo "$1 rows=$3 ahead=$4 $(grep -oE '"replay_ms": \[[^]]*\], "replay_ms_min": [0-9.]+' $OUT/probe_$1_$3.log) $(grep -E 'Error|Traceback' $OUT/probe_$1_$3.log | tail -1)" | tee -a $OUT/ab.txt
}
for spec in $RUNS; do IFS=: read label src rows ahead <<< "$spec"; probe $label $src $rows $ahead; done
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch, glob
fs = sorted(glob.glob('/tmp/logits_*.pt'))
for rows in ('1', '32'):
    g = [f for f in fs if f.endswith(f'_{rows}.pt')]
    base = [f for f in g if 'prev_' in f]
    if not base: continue
    x = torch.load(base[0])
    for f in g: print(rows, f, torch.equal(x, torch.load(f)))
" 2>&1 | tee -a $OUT/ab.txt
