"""Where a decode step's time goes: GPU time per kernel of one replayed decode step (run on a CUDA machine).

    python bench/step_profile.py --model random-7b --rows 1,8,32 --out out/

For each engine size (and each NF4 backend that size can take: the package's choice, plus
Triton where the choice is CUDA) the compiled decode step is captured as the engine does it,
every slot is put at position `--position`, and a few replays are profiled. Kernels are
grouped (NF4 matmul, decode attention, inductor's fused elementwise kernels, the lm_head GEMM,
other), with their GPU microseconds per step, count per step and share of the step; the
step's wall time is measured separately without the profiler. Prints a table per engine;
writes step_profile.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections import defaultdict

import torch

from mistral_t4 import devices, kernels, loading
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral

GROUPS = (  # first match wins: (group, prefixes or substrings of the kernel name)
    ("fused_elementwise", ("triton_poi", "triton_red", "triton_per")),  # inductor's (named after the ops they fuse)
    ("nf4_matmul", ("nf4_matmul", "_nf4_", "gemm_4bit", "kgemm_4bit")),
    ("decode_attention", ("_decode_attention", "_combine_splits")),
    ("add_rms_norm", ("_add_rms_norm",)),  # ours (kernels/norm_triton.py), since s9
    ("dense_gemm", ("gemm", "cutlass", "sm90_xmma", "ampere_", "sm80_", "nvjet")),
)


def group_of(name: str) -> str:
    for group, parts in GROUPS:
        if any(name.startswith(part) if group == "fused_elementwise" else part in name for part in parts):
            return group
    return "other"


def profile_step(engine: Engine, replays: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        engine._decode_logits()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        engine._decode_logits()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / 20 * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            engine._decode_logits()
        torch.cuda.synchronize()
    kernels_us: dict[str, list[float]] = defaultdict(list)
    spans = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            kernels_us[event.name].append(event.device_time_total)
            spans.append((event.time_range.start, event.time_range.end, event.name))
    ordered = timeline(spans)
    advance = credits(ordered)
    origin = ordered[0][0][0]
    # 36 kernels from the first replay's 11th on (four to five layers at 7-8 kernels per layer):
    # start (us from the replay's first kernel), duration, credit
    sequence = [{"name": name[:60], "start_us": round(start - origin, 2), "us": round(end - start, 2),
                 "advance_us": round(value, 2)} for (start, end, name), value in ordered[10:46]]
    per_kernel = sorted(((name, sum(times) / replays, len(times) / replays) for name, times in kernels_us.items()),
                        key=lambda item: -item[1])
    total = sum(us for _, us, _ in per_kernel)
    groups: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "count": 0.0, "advance_us": 0.0})
    for name, us, count in per_kernel:
        groups[group_of(name)]["us"] += us
        groups[group_of(name)]["count"] += count
        groups[group_of(name)]["advance_us"] += advance[name] / replays
    return {
        "step_ms": round(step_ms, 4),
        "kernel_us_per_step": round(total, 1),
        "gaps_us_per_step": round(step_ms * 1000 - total, 1),  # launch gaps and idle time inside the graph
        "busy_us_per_step": round(sum(advance.values()) / replays, 1),
        "groups": {g: {"us": round(v["us"], 1), "count": round(v["count"], 1), "share": round(v["us"] / total, 3),
                       "advance_us": round(v["advance_us"], 1)}
                   for g, v in sorted(groups.items(), key=lambda item: -item[1]["us"])},
        "kernels": [{"name": name[:160], "us": round(us, 2), "count": round(count, 2),
                     "advance_us": round(advance[name] / replays, 2)} for name, us, count in per_kernel],
        "sequence": sequence,
    }


def advances(spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Per kernel name, the time by which its kernels moved the end of the GPU's work so far: kernels
    sorted by start, each credited with end - (latest end before it) when positive. Kernels that run
    under a longer one (programmatic dependent launch overlaps them) get nothing; the credits add up
    to the time the GPU had work, so they say where a step's time goes when the kernel times overlap."""
    return credits(timeline(spans))


def credits(ordered: list[tuple[tuple[float, float, str], float]]) -> dict[str, float]:
    """`timeline`'s credits summed per kernel name."""
    credit: dict[str, float] = defaultdict(float)
    for (_, _, name), value in ordered:
        credit[name] += value
    return credit


def timeline(spans: list[tuple[float, float, str]]) -> list[tuple[tuple[float, float, str], float]]:
    """The spans sorted by start, each with its credit (see `advances`)."""
    out, latest = [], None
    for span in sorted(spans):
        start, end, _ = span
        value = 0.0
        if latest is None or end > latest:
            value = end - (start if latest is None else max(start, latest))
            latest = end
        out.append((span, value))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp16"])
    parser.add_argument("--rows", default="1,8,32", help="engine sizes (slots), comma-separated")
    parser.add_argument("--position", type=int, default=192, help="every slot's position (W32's mean is ~192)")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--memory-cap-gib", type=float, default=15.0)
    parser.add_argument("--out", default="out")
    parser.add_argument("--no-triton", action="store_true", help="only the package's kernel choice per size")
    args = parser.parse_args()
    device = devices.pick_device("cuda")
    model, tokenizer = loading.load(args.model, quant=args.quant, device=device, memory_cap_gib=args.memory_cap_gib)
    results = {"system": devices.describe(device), "model": args.model, "quant": args.quant,
               "position": args.position, "engines": []}
    for rows in (int(r) for r in args.rows.split(",")):
        choice = kernels.select_kernels(device, decode_rows=rows)
        choices = [choice]
        if choice["nf4_linear"] == "cuda" and not args.no_triton:
            choices.append({**choice, "nf4_linear": "triton"})
        for kernel_choice in choices:
            fast = FastMistral.from_hf(model, kernel_choice)
            engine = Engine(fast, tokenizer, max_batch=rows, max_len=args.max_len, compile=True)
            engine.warmup()
            engine.positions.fill_(args.position)
            entry = {"rows": rows, "kernels": kernel_choice, **profile_step(engine, args.replays)}
            results["engines"].append(entry)
            print(f"\n{rows} rows, nf4_linear={kernel_choice['nf4_linear']}: step {entry['step_ms']:.3f} ms, "
                  f"kernels {entry['kernel_us_per_step']:.0f} us, gaps {entry['gaps_us_per_step']:.0f} us")
            print(f"  busy {entry['busy_us_per_step']:.0f} us (advance: the part of the step each kernel ends)")
            for group, value in entry["groups"].items():
                print(f"  {group:18s} {value['us']:8.1f} us  {value['count']:6.1f} kernels  {100 * value['share']:5.1f}%"
                      f"  advance {value['advance_us']:8.1f} us")
            for kernel in entry["sequence"][:20]:
                print(f"    at {kernel['start_us']:8.2f} us  {kernel['us']:6.2f} us  advance {kernel['advance_us']:6.2f}  "
                      f"{kernel['name']}")
            for kernel in entry["kernels"][:12]:
                print(f"    {kernel['us']:8.1f} us {kernel['count']:6.1f}x  advance {kernel['advance_us']:8.1f} us  "
                      f"{kernel['name'][:90]}")
            del engine, fast
            torch.cuda.empty_cache()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_profile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
