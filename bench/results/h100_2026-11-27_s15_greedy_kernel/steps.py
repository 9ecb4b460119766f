"""engine.step() loop time per step and the greedy tokens, at 1 and 32 rows (this build)."""
import hashlib, json, sys, time, torch
from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request
from mistral_t4.workload import make_prompts
label = sys.argv[1]
device = devices.pick_device("cuda")
model, tok = loading.load("random-7b", quant="nf4", device=device, memory_cap_gib=15)
for rows in (1, 32):
    fast = FastMistral.from_hf(model, kernels.select_kernels(device, decode_rows=rows))
    engine = Engine(fast, tok, max_batch=rows, max_len=384, compile=True, memory_cap_gib=15)
    engine.warmup()
    prompts = make_prompts(tok, rows, 128, 0)
    times = []
    for trial in range(3):
        seqs = [engine.prepare(Request(prompt=p, max_new_tokens=200, ignore_eos=True)) for p in prompts]
        engine.admit(seqs)
        for _ in range(10): engine.step()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(150): engine.step()
        torch.cuda.synchronize(); times.append(round((time.perf_counter() - t0) / 150 * 1000, 4))
        while engine.active: engine.step()
        digest = hashlib.sha256(json.dumps([s.tokens for s in seqs]).encode()).hexdigest()[:16]
    print("STEPS", json.dumps(dict(label=label, rows=rows, step_ms=times, tokens_sha=digest, first=seqs[0].tokens[:8])), flush=True)
    del engine, fast; torch.cuda.empty_cache()
