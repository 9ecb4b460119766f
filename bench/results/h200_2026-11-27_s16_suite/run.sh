#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader | tee $OUT/card.txt
SKIP_CHECK=1 OUT=/tmp/suite timeout 260 bash bench/gpu_suite.sh > $OUT/suite.log 2>&1; echo "suite rc $?"
cp /tmp/suite/nb04/benchmark.json /tmp/suite/nb04/floor.png /tmp/suite/nb04/latency.png $OUT/ 2>/dev/null
grep -E "floor:|sweep batch .*peak|batch 1:|^mistral_t4|^hf-" $OUT/suite.log | tail -14
timeout 230 python3 bench/gpu_check.py --quants nf4 --out $OUT > $OUT/gpu_check.log 2>&1; echo "check rc $?"
grep -E '^nf4 ' $OUT/gpu_check.log | cut -c1-60; grep -oE '"(greedy_steps_equal_hf|argmax_agree|decode_rel_err_max)": [^,}]*' $OUT/gpu_check.log | head -20
[ -n "$PREFILL" ] && { timeout 100 python3 .probe/prefill_prof.py > $OUT/prefill_prof.txt 2>&1; echo "prefill rc $?"; grep -v Warn $OUT/prefill_prof.txt | tail -22; }
tail -c 300 $OUT/suite.log
