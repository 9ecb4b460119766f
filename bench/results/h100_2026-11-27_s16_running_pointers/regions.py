"""Fresh-process compile + warm-up time and replay time of the decode step, one kernel choice."""
import json, os, sys, time, torch
from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
label, cap, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = devices.pick_device("cuda")
model, tok = loading.load("random-7b", quant="nf4", device=device, memory_cap_gib=15)
choice = kernels.select_kernels(device, decode_rows=rows, capability=(7, 5) if cap == "t4" else None)
fast = FastMistral.from_hf(model, choice)
engine = Engine(fast, tok, max_batch=rows, max_len=256, compile=True, memory_cap_gib=15)
t0 = time.perf_counter()
warm = engine.warmup()
g = torch.Generator(device="cpu").manual_seed(0)
engine.tokens.copy_(torch.randint(3, 32000, (rows,), generator=g))
engine.positions.copy_(torch.randint(100, 200, (rows,), generator=g))
engine._graph.replay(); torch.cuda.synchronize()
logits = engine._graph_logits.clone()
torch.save(logits.cpu(), f"/tmp/logits_{label}_{cap}_{rows}.pt")
for _ in range(20): engine._graph.replay()
times = []
for r in range(5):
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(100): engine._graph.replay()
    torch.cuda.synchronize(); times.append((time.perf_counter() - s) * 10)
out = dict(label=label, cap=cap, rows=rows, cpus=len(os.sched_getaffinity(0)), choice=choice, races=kernels.races(),
           arch=os.environ.get("MISTRAL_T4_NF4_CUDA_ARCH"), plans=fast.nf4_cuda_plans(rows), warmup_s=round(warm, 2),
           replay_ms=[round(t, 4) for t in times], replay_ms_min=round(min(times), 4))
print("RESULT", json.dumps(out), flush=True)
from torch.profiler import profile, ProfilerActivity
from collections import Counter
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3): engine._graph.replay()
    torch.cuda.synchronize()
names = Counter(); total = Counter()
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        names[e.name[:70]] += 1; total[e.name[:70]] += e.device_time
print("KERNELS", json.dumps({k: [v // 3, round(total[k] / 3, 1)] for k, v in sorted(names.items())}), flush=True)
