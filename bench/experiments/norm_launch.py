"""Experiment: the decode step's add + RMSNorm kernel launched with other warp counts.

    python bench/experiments/norm_launch.py [--rows 1,32] [--warps 8,4,2,16]   # on a CUDA GPU; $OUT/norm_launch.json

In a 32-row decode step the two add + RMSNorm kernels of a layer (`kernels/norm_triton.py`, one program of
8 warps per row) advance the step by ~4.5 us each, against ~2.2 at 1 row, for 256 KB of rows
(bench/results/h200_2026-11-27_s10_scale_a/step_profile_rows1_rows32.json). One reading: the 12-warp 32-row
kernel of o and down holds 61 K of an SM's 64 K registers, so the norm's programs (8 warps x ~48 registers)
cannot start beside it while it runs. This builds the engine at each size once per warp count (the norm's
launch patched, everything else the package's), and times the compiled decode step as bench/step_profile.py
does, with each kernel's advance.
"""
import argparse
import json
import os
import pathlib
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def patched_launch(warps: int):
    """norm_triton.add_rms_norm with `warps` warps per program (the package: min(16, max(1, BLOCK / 512)))."""
    import triton

    from mistral_t4.kernels import norm_triton

    def add_rms_norm(x, delta, weight, eps, out=None):
        total, h = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
        if x.shape[0] == 0:
            return total, h
        norm_triton._add_rms_norm_kernel[(x.shape[0],)](
            x, delta, weight, total, h, x.shape[1], x.stride(0), delta.stride(0), total.stride(0), h.stride(0), eps,
            BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=warps, **norm_triton.pdl_options(x.device))
        return total, h

    return add_rms_norm


def main():
    from step_profile import profile_step

    from mistral_t4 import devices, kernels, loading
    from mistral_t4.engine import Engine
    from mistral_t4.kernels import norm_triton
    from mistral_t4.model import FastMistral

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--warps", default="8,4,2,16,8", help="warp counts in the order run (8 = the package's)")
    parser.add_argument("--position", type=int, default=192)
    args = parser.parse_args()
    device = devices.pick_device("cuda")
    model, tokenizer = loading.load(args.model, quant="nf4", device=device, memory_cap_gib=15)
    package = norm_triton.add_rms_norm
    results = {"system": devices.describe(device), "model": args.model, "position": args.position, "runs": []}
    for rows in (int(r) for r in args.rows.split(",")):
        choice = kernels.select_kernels(device, decode_rows=rows)
        for warps in (int(w) for w in args.warps.split(",")):
            norm_triton.add_rms_norm = patched_launch(warps)
            try:
                fast = FastMistral.from_hf(model, choice)
                engine = Engine(fast, tokenizer, max_batch=rows, max_len=256, compile=True)
                engine.warmup()
                engine.positions.fill_(args.position)
                profile = profile_step(engine, 10)
            finally:
                norm_triton.add_rms_norm = package
            norm = profile["groups"].get("add_rms_norm", {})
            run = {"rows": rows, "warps": warps, "step_ms": profile["step_ms"],
                   "norm_advance_us_per_step": norm.get("advance_us"), "norm_us_per_step": norm.get("us"),
                   "groups": profile["groups"]}
            results["runs"].append(run)
            print(f"{rows:3d} rows, norm {warps:2d} warps: step {run['step_ms']:.4f} ms, norms advance "
                  f"{run['norm_advance_us_per_step']} us / step (their own time {run['norm_us_per_step']} us)", flush=True)
            del engine, fast
            torch.cuda.empty_cache()
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_launch.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
