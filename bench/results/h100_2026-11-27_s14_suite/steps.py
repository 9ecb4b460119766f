"""Steady-state time per engine.step() (host loop included) against the replayed graph alone."""
import json, sys, time, torch
from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request
label, rows = sys.argv[1], int(sys.argv[2])
device = devices.pick_device("cuda")
model, tok = loading.load("random-7b", quant="nf4", device=device, memory_cap_gib=15)
fast = FastMistral.from_hf(model, kernels.select_kernels(device, decode_rows=rows))
engine = Engine(fast, tok, max_batch=rows, max_len=512, compile=True, memory_cap_gib=15)
engine.warmup()
g = torch.Generator().manual_seed(1)
seqs = [engine.prepare(Request(prompt=torch.randint(3, 32000, (128,), generator=g).tolist(), max_new_tokens=360,
                               ignore_eos=True)) for _ in range(rows)]
engine.admit(seqs)
for _ in range(20): engine.step()
torch.cuda.synchronize()
best = []
for _ in range(3):
    t = time.perf_counter()
    for _ in range(100): engine.step()
    torch.cuda.synchronize()
    best.append((time.perf_counter() - t) * 10)
while engine.active: engine.step()
graph = engine._graph
for _ in range(10): graph.replay()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(100): graph.replay()
torch.cuda.synchronize(); replay = (time.perf_counter() - t) * 10
print("STEPS", json.dumps(dict(label=label, rows=rows, step_ms=[round(b, 4) for b in best], replay_ms=round(replay, 4),
                               first_tokens=seqs[0].tokens[:8])), flush=True)
