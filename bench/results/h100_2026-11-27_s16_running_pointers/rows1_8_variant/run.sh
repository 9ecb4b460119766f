#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/card.txt
probe() {  # label src rows
  rm -rf /tmp/ind; TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$2 timeout 100 python3 .probe/regions.py $1 sm90 $3 > $OUT/probe_$1_$3.log 2>&1
  echo "$1 rows=$3 $(grep -oE '"replay_ms": \[[^]]*\], "replay_ms_min": [0-9.]+' $OUT/probe_$1_$3.log) $(grep -E 'Error|Traceback' $OUT/probe_$1_$3.log | tail -1)" | tee -a $OUT/ab.txt
}
for rows in ${ROWS:-1 8}; do
  probe new $PWD/src $rows; probe var .probe/var/src $rows; probe new2 $PWD/src $rows; probe var2 .probe/var/src $rows
done
PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import torch, glob
for rows in '${ROWS:-1 8}'.split():
    x = torch.load(f'/tmp/logits_new_sm90_{rows}.pt').float()
    for f in sorted(glob.glob(f'/tmp/logits_*_sm90_{rows}.pt')):
        y = torch.load(f).float()
        print(rows, f, 'equal', torch.equal(x, y), 'max|diff|', (x - y).abs().max().item())
" 2>&1 | tee -a $OUT/ab.txt
