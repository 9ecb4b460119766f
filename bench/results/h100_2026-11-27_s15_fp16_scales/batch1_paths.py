"""Batch 1: graph replay alone vs engine.step() loop vs the Worker (the benchmark's path), same engine."""
import json, statistics, sys, time, torch
from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request
from mistral_t4.worker import Worker
from mistral_t4.workload import make_prompts, run_workload
device = devices.pick_device("cuda")
model, tok = loading.load("random-7b", quant="nf4", device=device, memory_cap_gib=15)
fast = FastMistral.from_hf(model, kernels.select_kernels(device, decode_rows=1))
engine = Engine(fast, tok, max_batch=1, max_len=384, compile=True, memory_cap_gib=15)
engine.warmup()
prompt = make_prompts(tok, 1, 128, 0)[0]
out = {}
# 1. engine.step() loop, one request of 128 -> 256
for trial in range(2):
    seq = engine.prepare(Request(prompt=prompt, max_new_tokens=256, ignore_eos=True))
    engine.admit([seq])
    t0 = time.perf_counter(); steps = 0
    while engine.active:
        engine.step(); steps += 1
    for _ in range(2): engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    times = getattr(seq, "token_times", None) or getattr(seq, "times", None)
    out[f"step_loop_{trial}_ms_per_step"] = round(wall / steps * 1000, 4)
# 2. replay alone at the position the request ends near
engine.positions.fill_(256); engine.tokens.fill_(5)
for _ in range(20): engine._graph.replay()
torch.cuda.synchronize(); s = time.perf_counter()
for _ in range(200): engine._graph.replay()
torch.cuda.synchronize(); out["replay_ms"] = round((time.perf_counter() - s) / 200 * 1000, 4)
# 3. replay + greedy + copies as step() does, no host bookkeeping
s = time.perf_counter()
for _ in range(200):
    engine._graph.replay(); nt = engine._graph_logits.argmax(-1); engine.tokens.copy_(nt); engine.positions.add_(engine.running)
torch.cuda.synchronize(); out["replay_argmax_ms"] = round((time.perf_counter() - s) / 200 * 1000, 4)
engine.reset()
# 4. the Worker, as the benchmark
with Worker(engine) as worker:
    run_workload(worker, [prompt], 4, progress=False)
    for trial in range(2):
        r = run_workload(worker, [prompt], 256, progress=False)
        out[f"worker_{trial}_p50_ms"] = r["token_latency_p50_ms"]; out[f"worker_{trial}_wall_s"] = r["wall_s"]
print("RESULT", json.dumps(out), flush=True)
