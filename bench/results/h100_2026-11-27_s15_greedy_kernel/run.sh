#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
for spec in prev:.probe/prev/src new:$PWD/src prev2:.probe/prev/src new2:$PWD/src; do IFS=: read label src <<< "$spec"
  rm -rf /tmp/ind; TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=/tmp/site:$src timeout 200 python3 .probe/steps2.py $label > $OUT/steps_$label.log 2>&1
  grep -E "STEPS|Error|Traceback" $OUT/steps_$label.log | tail -3 | tee -a $OUT/steps.txt
done
