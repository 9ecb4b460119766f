"""Where a W32 prefill (32 x 128 tokens, one call) spends its GPU time, by kernel name."""
import json, time, torch
from collections import defaultdict
from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request
from mistral_t4.workload import make_prompts
device = devices.pick_device("cuda")
model, tok = loading.load("random-7b", quant="nf4", device=device, memory_cap_gib=15)
fast = FastMistral.from_hf(model, kernels.select_kernels(device, decode_rows=32))
engine = Engine(fast, tok, max_batch=32, max_len=256, compile=True, memory_cap_gib=15)
engine.warmup()
prompts = make_prompts(tok, 32, 128, 0)
def prefill():
    seqs = [engine.prepare(Request(prompt=p, max_new_tokens=4, ignore_eos=True)) for p in prompts]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    engine.admit(seqs)
    torch.cuda.synchronize(); t = time.perf_counter() - t0
    engine.reset()
    return t
times = [prefill() for _ in range(3)]
print("ADMIT_S", [round(t, 4) for t in times], flush=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    prefill()
total, count = defaultdict(float), defaultdict(int)
ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
for e in ev:
    total[e.name[:60]] += e.device_time; count[e.name[:60]] += 1
span = (max(e.time_range.end for e in ev) - min(e.time_range.start for e in ev)) / 1000
busy = sum(total.values()) / 1000
print("SPAN_MS", round(span, 2), "BUSY_MS", round(busy, 2), flush=True)
for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:18]:
    print(f"  {v/1000:8.2f} ms  n={count[k]:4d}  {k}", flush=True)
ev = sorted(ev, key=lambda e: e.time_range.start)
gaps = []
for a, b in zip(ev, ev[1:]):
    gap = b.time_range.start - max(a.time_range.end, 0)
    gaps.append((gap, a.name[:50], b.name[:50], a.time_range.end))
t0 = ev[0].time_range.start
print("GAPS_TOTAL_MS", round(sum(g for g, *_ in gaps if g > 0) / 1000, 2), "over_20us", sum(1 for g, *_ in gaps if g > 20))
for g, a, b, t in sorted(gaps, reverse=True)[:25]:
    print(f"  gap {g:8.1f} us at {(t - t0) / 1000:7.2f} ms  after {a}  before {b}", flush=True)
# where the host copies are (pageable HtoD): with the CPU side, their Python stacks
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof2:
    prefill()
from collections import Counter
stacks = Counter()
for e in prof2.events():
    if e.name in ("aten::copy_", "aten::_to_copy", "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize"):
        st = [s for s in (e.stack or []) if "mistral_t4" in s or "torch/nn/functional" in s][:3]
        stacks[(e.name, tuple(st))] += 1
for (name, st), n in stacks.most_common(15):
    print("HOST", n, name, " | ".join(st), flush=True)
