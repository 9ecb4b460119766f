#!/bin/bash
# prev (HEAD before regions) vs new, fresh inductor caches; sm90 choice on all CPUs, T4 choice on 2 CPUs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 MISTRAL_T4_CACHE=$PWD/.cache/mistral_t4 HF_HUB_OFFLINE=1
run() {  # label src cap rows cpus
  rm -rf /tmp/ind_$1_$3; export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$1_$3
  PYTHONPATH=/tmp/site:$2 timeout 280 taskset -c $5 python3 .probe/regions.py $1 $3 $4 2>&1 | grep -E "RESULT|KERNELS|Error|error" | tail -3 | tee -a ${OUT:-/tmp}/regions.txt
}
for spec in "$@"; do run $spec; done
python3 - <<'PY'
import glob, torch
files = sorted(glob.glob("/tmp/logits_*.pt"))
for cap in ("sm90_1", "sm90_32", "t4_32"):
    f = [x for x in files if x.endswith(f"_{cap}.pt")]
    if len(f) == 2:
        a, b = torch.load(f[0]), torch.load(f[1])
        print("LOGITS", cap, f, "max diff", (a - b).abs().max().item(), "argmax equal", (a.argmax(-1) == b.argmax(-1)).float().mean().item())
PY
