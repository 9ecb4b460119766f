"""GPU activity between two decode steps of engine.step() (rows from argv): the kernels and copies after each graph."""
import sys, time, torch
from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request
rows = int(sys.argv[1])
device = devices.pick_device("cuda")
model, tok = loading.load("random-7b", quant="nf4", device=device, memory_cap_gib=15)
fast = FastMistral.from_hf(model, kernels.select_kernels(device, decode_rows=rows))
engine = Engine(fast, tok, max_batch=rows, max_len=512, compile=True, memory_cap_gib=15)
engine.warmup()
g = torch.Generator().manual_seed(1)
seqs = [engine.prepare(Request(prompt=torch.randint(3, 32000, (128,), generator=g).tolist(), max_new_tokens=200,
                               ignore_eos=True)) for _ in range(rows)]
engine.admit(seqs)
for _ in range(20): engine.step()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    for _ in range(4): engine.step()
    torch.cuda.synchronize()
ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
ev.sort(key=lambda e: e.time_range.start)
t0 = ev[0].time_range.start
prev_end = None
for e in ev:
    s, t = e.time_range.start - t0, e.time_range.end - t0
    gap = "" if prev_end is None else f"gap {s - prev_end:7.1f}"
    if prev_end is None or s - prev_end > 3 or not any(k in e.name for k in ("nf4_", "_decode_att", "_combine")):
        print(f"{s:9.1f} {t:9.1f} {gap:12s} {e.name[:70]}")
    prev_end = max(prev_end or 0, t)
cpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and
       any(k in e.name for k in ("cudaGraphLaunch", "cudaMemcpyAsync", "cudaEventSynchronize", "cudaLaunchKernel", "cudaEventRecord", "cudaStreamSynchronize"))]
for e in sorted(cpu, key=lambda e: e.time_range.start)[:40]:
    print(f"CPU {e.time_range.start - t0:9.1f} {e.time_range.end - e.time_range.start:8.1f} {e.name}")
