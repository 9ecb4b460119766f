"""GPU correctness check of our forward against Hugging Face on the same weights (run on a CUDA machine).

    python bench/gpu_check.py --model random-7b --quants fp16,nf4 --out out/

For each weight format: prefill logits and teacher-forced decode logits of FastMistral vs
the HF model (relative error per step), greedy tokens of our engine vs HF generate (how many
steps agree), for the kernels chosen for its 4-slot engine ("fast"), the references, and on NF4
the Triton kernel (if "fast" took the CUDA one), "fast" with the step's own RMSNorm kernels (where it
does them in the matmuls' epilogues) and the T4 path (with bitsandbytes' kernel too, if
the T4's race here picked ours); evidence that the compiled
decode step replays as a CUDA graph (graph launches vs kernel launches in a profile).
Prints a table; writes gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request
from mistral_t4.workload import make_prompts


ENGINE_ROWS = 4  # slots of the engines checked here, by default (engines of up to 64 take the CUDA NF4 kernel on sm80+)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def teacher_forced(hf, fast: FastMistral, engine: Engine, prompt: list[int], steps: int) -> dict:
    """Run HF on prompt + its greedy continuation; feed the same tokens to our prefill + decode; compare logits."""
    device = fast.device
    ids = torch.tensor([prompt], device=device)
    continuation = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    full = continuation[0]
    ref = hf(full[None]).logits[0].float()  # (T, vocab): logits after every position
    n = len(prompt)
    slot = torch.tensor([0], device=device)
    padded = torch.zeros(1, engine.prefill_bucket * ((n + engine.prefill_bucket - 1) // engine.prefill_bucket),
                         dtype=torch.long, device=device)
    padded[0, :n] = full[:n]
    errors = [rel(fast.prefill(padded, torch.tensor([n], device=device), slot, torch.tensor([-1], device=device),
                               engine.prefill_ops)[0],
                  ref[n - 1])]
    tokens = torch.zeros(engine.max_batch, dtype=torch.long, device=device)
    positions = torch.zeros(engine.max_batch, dtype=torch.long, device=device)
    adapters = torch.full((engine.max_batch,), -1, dtype=torch.long, device=device)
    agree = 0
    for step in range(steps - 1):
        tokens[0] = full[n + step]
        positions[0] = n + step
        logits = fast.decode(tokens, positions, adapters)[0]
        errors.append(rel(logits, ref[n + step]))
        agree += int(logits.argmax() == ref[n + step].argmax())
    return {"prefill_rel_err": errors[0], "decode_rel_err_max": max(errors[1:]),
            "decode_rel_err_mean": sum(errors[1:]) / len(errors[1:]), "argmax_agree": f"{agree}/{steps - 1}"}


def greedy_agreement(hf, engine: Engine, prompts: list[list[int]], steps: int) -> list[int]:
    """Steps until our engine's greedy tokens first differ from HF generate's, per prompt."""
    seqs = [engine.prepare(Request(prompt=p, max_new_tokens=steps, ignore_eos=True)) for p in prompts]
    engine.admit(seqs)
    while engine.active:
        engine.step()
    out = []
    for p, seq in zip(prompts, seqs):
        ids = torch.tensor([p], device=engine.device)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)[0, len(p):].tolist()
        same = next((i for i, (a, b) in enumerate(zip(seq.tokens, ref)) if a != b), steps)
        out.append(same)
    return out


def graph_evidence(engine: Engine) -> dict:
    """Profile a few decode steps: a replayed CUDA graph shows as one cudaGraphLaunch, not ~100s of launches."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        engine._decode_logits().argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine._decode_logits().argmax(-1)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    start = time.perf_counter()
    for _ in range(20):
        engine._decode_logits().argmax(-1)
    torch.cuda.synchronize()
    return {
        "cudaGraphLaunch_per_step": sum(n == "cudaGraphLaunch" for n in names) / 5,
        "cudaLaunchKernel_per_step": sum(n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx") for n in names) / 5,
        "step_ms": round((time.perf_counter() - start) / 20 * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--quants", default="fp16,nf4")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default="out")
    parser.add_argument("--rows", type=int, default=ENGINE_ROWS,
                        help="the engines' slots (--rows 32 or 64 checks the 32- or 64-row CUDA kernels)")
    args = parser.parse_args()
    device = devices.pick_device("cuda")
    results = {"system": devices.describe(device), "model": args.model, "rows": args.rows, "quants": {}}
    for quant in args.quants.split(","):
        model, tokenizer = loading.load(args.model, quant=quant, device=device)
        hf = loading.base_model(model)
        prompts = [p[:n] for p, n in zip(make_prompts(tokenizer, 4, 128), (128, 77, 100, 33))]
        entry = {}
        fast_choice = kernels.select_kernels(device, decode_rows=args.rows)
        variants = [("fast", fast_choice), ("reference", kernels.select_kernels(device, True))]
        if quant == "nf4":
            if fast_choice["nf4_linear"] != "triton":  # the NF4 kernel of larger batches, at this batch
                variants.append(("triton", {"nf4_linear": "triton", "decode_attention": "triton"}))
            # the kernels a T4 (sm75) gets, run here to check that path is correct (before s11 this took the
            # Triton attention, which a T4 does not: `select_kernels` keeps the reference attention there). Its NF4
            # backend is the winner of `kernels.nf4_race` on this card; MISTRAL_T4_NF4_CUDA_ARCH=compute_75 makes
            # the CUDA kernels the T4's code and plans too (s12)
            # the decode step's own add + RMSNorm kernels, where "fast" does its norms in the matmuls (s13)
            variants.append(("fast_norm_kernels", fast_choice))
            t4 = kernels.select_kernels(device, decode_rows=args.rows, capability=(7, 5))
            variants.append(("t4_path", t4))
            if t4["nf4_linear"] != "bnb":  # bitsandbytes' kernel, which a T4 takes where it wins the race there
                variants.append(("t4_bnb", {**t4, "nf4_linear": "bnb"}))
        for label, choice in variants:
            force = label == "reference"
            fast = FastMistral.from_hf(model, choice)
            if label == "fast_norm_kernels":
                if not fast.folds_norms(args.rows):
                    continue  # the same as "fast"
                fast.norms_in_matmuls = False
            engine = Engine(fast, tokenizer, max_batch=args.rows, max_len=256, compile=not force)
            compile_s = engine.warmup()
            item = {"kernels": choice, "norms_in_matmuls": fast.folds_norms(args.rows), "compile_s": round(compile_s, 1),
                    "teacher_forced": teacher_forced(hf, fast, engine, prompts[0], args.steps),
                    "greedy_steps_equal_hf": greedy_agreement(hf, engine, prompts, args.steps)}
            if label == "fast":
                item["graph"] = graph_evidence(engine)
            entry[label] = item
            print(quant, label, json.dumps(item), flush=True)
            del engine, fast
            torch.cuda.empty_cache()
        results["quants"][quant] = entry
        del model, hf
        torch.cuda.empty_cache()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
