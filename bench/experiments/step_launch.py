"""Experiment: the decode step's small kernels launched otherwise, timed in the compiled step itself.

    python bench/experiments/step_launch.py [--rows 1,32] [--warps 8,4,2,16]   # on a CUDA GPU; $OUT/norm_launch.json
    python bench/experiments/step_launch.py --rows 1,32 --attention "64,4,2;32,4,2;64,8,2;64,4,3;64,4,2,1"
                                                                               # $OUT/attention_launch.json
    python bench/experiments/step_launch.py --rows 1,32 --plans "rule;6144,4096,3,1,8;rule"  # $OUT/plan_launch.json

Timed in the step, not alone: under programmatic dependent launch a kernel's cost is how far it moves the end of
the step's work, which depends on what runs beside it (the kernels' own timings with the L2 flushed,
attention_tiles.py, said the attention's launch was the best or within 3%).

`--warps`: the add + RMSNorm kernel's warps per row.

Before s11, in a 32-row decode step the two add + RMSNorm kernels of a layer (`kernels/norm_triton.py`, one
program of 8 warps per row) advanced the step by ~4.5 us each, against ~2.2 at 1 row, for 256 KB of rows
(bench/results/h200_2026-11-27_s10_scale_a/step_profile_rows1_rows32.json). One reading: the 12-warp 32-row
kernel of o and down holds 61 K of an SM's 64 K registers, so the norm's programs (8 warps x ~48 registers)
cannot start beside it while it runs. This builds the engine at each size once per warp count (the norm's
launch patched, everything else the package's), and times the compiled decode step as bench/step_profile.py
does, with each kernel's advance. Result (H200, norm_launch_h200_2026-11-27.json, norm_launch_rows_h200_2026-11-27.json):
16 warps (one 16-byte vector per thread) against the 8 the package launched: 32 rows 3.661 / 3.670 -> 3.552 / 3.572
ms per step (the norms' advance 278 -> 183 us per step), 64 rows 5.423 -> 5.382 / 5.391, 8 rows 2.310 -> 2.313,
1 row 2.158 -> 2.164 / 2.160; 32 warps 3.581 at 32 rows. The package took 16 (`norm_triton.num_warps`). A
16-warp program needs more registers, not fewer, so the reading above does not explain the gain; what does (each
thread's one load per input instead of two, the reduction's depth) was not pinned down.
`--attention`: the decode attention's (positions per tile, warps, stages[, splits]) (`attention_triton._launch`;
the package's: 64, 4, 2 and `default_num_splits`). Result (H200, attention_launch_h200_2026-11-27.json, after the
norm's change): the package's launch is the best within noise at both sizes: 32 rows 3.532 / 3.580 ms per step
against 3.576-3.745 for every other tile, warp, stage or split count (1 split, the rule's choice there: 3.581);
1 row 2.160 / 2.161 against 2.152 for 8 warps, 2.153 for 8 splits (-0.4%, within the runs' spread) and up to
2.233 for 1 split. Not changed.
`--plans`: a CUDA NF4 matmul's (row groups per CTA, split, K ranges) for one weight shape, at every size (each
checked first to give the rule's bits). Result (H200, plan_launch_h200_2026-11-27.json): qkv is the one matmul whose
rule leaves SMs idle (4 groups per CTA: 96 CTAs on 132 SMs); 3 groups per CTA (128 CTAs, the kernel's odd tile with
a warp half busy) changes nothing measurable: 1 row 2.112 / 2.151 ms per step against 2.161 / 2.170, 32 rows
3.579 / 3.582 against 3.573 / 3.574, 16 rows 2.650 / 2.652 against 2.645 / 2.652. Not changed. (In this run and the
norm's first one, the first engine timed in the process was ~2% faster at 1 row than the same launch later on:
compare only interleaved repeats.)
`--tolerance` (s12): plans of another split, whose outputs differ from the rule's in the order of their sums. At 32
rows the rule gives o and down 2 row groups per CTA in 12 K ranges (128 CTAs), so every CTA reads all of x from L2: 117
MB for down against its 29 MB of weights. Larger tiles split across CTAs read less of it, and were slower (H200,
plan_launch_split_h200_2026-11-27.json): rule 3.554 / 3.595 ms per step; down in 4 groups x 2 splits x 6 ranges
3.729 / 3.741, in 8 x 4 x 3 3.804; o in 4 x 2 x 6 3.738 (outputs within 2e-5 of the rule's). Not changed.
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
    """norm_triton.num_warps giving `warps` warps per program (the package's rule: one 16-byte vector per thread)."""
    return lambda block: warps


def patched_attention(block_len: int, num_warps: int, num_stages: int, num_splits: int | None):
    """attention_triton._launch with these tiles (and splits, unless None: the package's rule)."""
    from mistral_t4.kernels import attention_triton

    package = attention_triton._launch

    def launch(q, n_heads, stride_qb, stride_qh, k_cache, v_cache, lengths, cos, sin, scale, sliding_window, out,
               num_splits_=None, **_):
        return package(q, n_heads, stride_qb, stride_qh, k_cache, v_cache, lengths, cos, sin, scale, sliding_window,
                       out, num_splits if num_splits is not None else num_splits_, block_len=block_len,
                       num_warps=num_warps, num_stages=num_stages)

    return launch


def patched_plan(n: int, k: int, tile: int, split: int, slices: int):
    """nf4_cuda.launch_plan with (row groups per CTA, split, K ranges) for the weight of shape (n, k), at any rows."""
    from mistral_t4.kernels import nf4_cuda

    package = nf4_cuda.launch_plan

    def launch_plan(m_, n_, k_, sm_count, ranges=True):
        kernel, *plan = package(m_, n_, k_, sm_count, ranges)
        return (kernel, tile, split, slices) if (n_, k_) == (n, k) else (kernel, *plan)

    return launch_plan


def same_outputs(plan, rows: int, device, tolerance: float = 0.0) -> bool:
    """Whether nf4_matmul at `rows` rows gives the same bits under the override `plan` (n, k, ...) as under the rule,
    on a random weight of that shape (the same K ranges sum each group in the same order, whichever CTA holds it);
    with a `tolerance`, whether their relative difference is within it (another split sums in another order)."""
    from gpu_kernels import random_param

    from mistral_t4.kernels import NF4Weight, nf4_cuda

    n, k = plan[:2]
    w = NF4Weight.from_bnb(random_param(k, n, device), backend="cuda")
    x = torch.randn(rows, k, dtype=torch.float16, device=device)
    expected = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters)
    package, nf4_cuda.launch_plan = nf4_cuda.launch_plan, patched_plan(*plan)
    try:
        got = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters)
    finally:
        nf4_cuda.launch_plan = package
    if tolerance:
        difference = float((got.float() - expected.float()).norm() / expected.float().norm())
        print(f"plan {plan} at {rows} rows: relative difference from the rule's outputs {difference:.1e}", flush=True)
        return difference <= tolerance
    return bool(torch.equal(got, expected))


def main():
    from step_profile import profile_step

    from mistral_t4 import devices, kernels, loading
    from mistral_t4.engine import Engine
    from mistral_t4.kernels import attention_triton, nf4_cuda, norm_triton
    from mistral_t4.model import FastMistral

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--warps", default="8,4,2,16,8", help="warp counts in the order run (the package's: 8 before "
                        "s11, 16 since, for 4096-wide rows)")
    parser.add_argument("--attention", help='attention launches "block,warps,stages[,splits];...", instead of --warps')
    parser.add_argument("--plans", help='CUDA NF4 plans "n,k,tile,split,slices" or "rule" (the package\'s), ";"-separated')
    parser.add_argument("--position", type=int, default=192)
    parser.add_argument("--tolerance", type=float, default=0.0, help="--plans: accept outputs within this relative "
                        "difference of the rule's (a plan of another split sums in another order); 0: the same bits")
    args = parser.parse_args()
    device = devices.pick_device("cuda")
    model, tokenizer = loading.load(args.model, quant="nf4", device=device, memory_cap_gib=15)
    package, package_attention, package_plan = norm_triton.num_warps, attention_triton._launch, nf4_cuda.launch_plan
    mode = "attention" if args.attention else "plan" if args.plans else "norm"
    results = {"system": devices.describe(device), "model": args.model, "position": args.position, "runs": []}
    for rows in (int(r) for r in args.rows.split(",")):
        choice = kernels.select_kernels(device, decode_rows=rows)
        if args.attention:
            variants = [tuple(int(v) for v in spec.split(",")) for spec in args.attention.split(";")]
        elif args.plans:
            variants = [spec if spec == "rule" else tuple(int(v) for v in spec.split(",")) for spec in args.plans.split(";")]
        else:
            variants = [int(w) for w in args.warps.split(",")]
        for variant in variants:
            if args.attention:
                attention_triton._launch = patched_attention(*variant[:3], variant[3] if len(variant) > 3 else None)
            elif args.plans:
                if variant != "rule":
                    if not same_outputs(variant, rows, device, args.tolerance):
                        raise SystemExit(f"plan {variant} at {rows} rows: outputs differ from the rule's")
                    nf4_cuda.launch_plan = patched_plan(*variant)
            else:
                norm_triton.num_warps = patched_launch(variant)
            try:
                fast = FastMistral.from_hf(model, choice)
                engine = Engine(fast, tokenizer, max_batch=rows, max_len=256, compile=True)
                engine.warmup()
                engine.positions.fill_(args.position)
                profile = profile_step(engine, 10)
            finally:
                norm_triton.num_warps, attention_triton._launch = package, package_attention
                nf4_cuda.launch_plan = package_plan
            group = profile["groups"].get({"attention": "decode_attention", "plan": "nf4_matmul"}.get(mode, "add_rms_norm"), {})
            run = {"rows": rows, mode: variant, "step_ms": profile["step_ms"],
                   "advance_us_per_step": group.get("advance_us"), "us_per_step": group.get("us"),
                   "groups": profile["groups"]}
            results["runs"].append(run)
            print(f"{rows:3d} rows, {mode} {variant}: step "
                  f"{run['step_ms']:.4f} ms, advance {run['advance_us_per_step']} us / step (own time "
                  f"{run['us_per_step']} us)", flush=True)
            del engine, fast
            torch.cuda.empty_cache()
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}_launch.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
