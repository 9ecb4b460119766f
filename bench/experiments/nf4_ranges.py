"""Experiment: the batch-1 CUDA kernel with K ranges per CTA, against a previous version of it.

    python bench/experiments/nf4_ranges.py [--previous OLD/nf4_cuda.py]   # sm80+; writes $OUT/nf4_ranges.json

The package's kernel (`mistral_t4.kernels.nf4_cuda`) lets a CTA's warps cut its K blocks into
ranges (`slices`) whose sums meet in shared memory, instead of splitting K across CTAs whose
partial sums go through global memory to the last CTA of a tile; and it sends the ring's first
weight loads before building its table. This script checks the kernel on odd shapes, tiles,
splits and ranges, then times every decode shape at 1 and 8 rows under the package's rule
(`matmul_geometry`) and over a sweep of (groups per CTA, split, ranges), beside the kernel of
`--previous` (another version's nf4_cuda.py, e.g. from `git show REV:src/...`) under its own rule.

Results (H200, CUDA-graph replay with L2 flushed), nf4_ranges_h200_2026-11-26.json (written by
this script's first version, whose keys call the previous kernel "head": 841fbb9's, one K range
per CTA): per layer at 8 rows 86.6 -> 68.7 us (o 14.6 -> 8.3,
qkv 15.0 -> 11.2, gate_up 34.4 -> 30.7, down 22.6 -> 18.5), at 1 row 65.7 -> 64.9; the rule's
choice is the sweep's best or within 2% per shape. Batch-1 decode did not change (2.674 /
2.677 ms/token before, 2.672 after); 8 requests x 128 -> 128 tokens: 3.22 -> 2.76 ms per step,
2,144 -> 2,500 output tokens/s (bench/results/h200_2026-11-26_s6_ranges/).
"""
import argparse
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--previous", help="another version's nf4_cuda.py to time beside the package's kernel")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, check_matmul, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda

    dev = torch.device("cuda")
    mod = nf4_cuda.module(dev)
    sms = multiprocessor_count(dev)
    time_ms = timer(dev)
    previous = None
    if args.previous:
        spec = importlib.util.spec_from_file_location("previous_nf4_cuda", args.previous)
        previous = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(previous)
        previous.mod = previous._Module(dev, previous.SOURCE)
        previous.shared = previous.table_shared_bytes(previous.mod)

    def launch(kernels, shared, x, w, tile, split, extra, out=None):
        m, k = x.shape
        n = w.packed.shape[0]
        out = torch.empty((m, n), dtype=torch.float16, device=dev) if out is None else out
        partial = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        kernels.launch("nf4_matmul", (-(-(n // 16) // tile), split), 32 * nf4_cuda.WARPS,
                       [x, w.packed, w.absmax, w.code_fp16, out, partial, w.tile_counters, m, n, k, x.stride(0),
                        out.stride(0), split, tile] + extra, shared=shared)
        return out

    def run(x, w, tile, split, slices, out=None):
        return launch(mod, mod.shared, x, w, tile, split, [slices], out)

    def run_previous(x, w):  # the previous version's rule: (groups per CTA, split)
        tile, split = previous.matmul_geometry(w.packed.shape[0], x.shape[1], sms)[:2]
        return launch(previous.mod, previous.shared, x, w, tile, split, [])

    failures = 0
    for n, k in [(96, 320), (48, 192), (1008, 4096), (4096, 14336), (6144, 4096)]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        ref_w = w.dequantize(torch.float32)
        for m in (1, 5, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ ref_w.T
            for tile, split, slices in [(2, 1, 16), (6, 2, 5), (14, 1, 2), (32, 1, 1), (4, 3, 8), (10, 1, 3), (12, 4, 2),
                                        (2, 1, 7)]:
                out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                run(x, w, tile, split, slices, out)
                failures += check_matmul(out, ref, w.tile_counters, f"n={n} k={k} m={m} {tile},{split},{slices}")
            out = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters)
            failures += check_matmul(out, ref, w.tile_counters, f"package n={n} k={k} m={m}")
    print("failures", failures, flush=True)
    results, per_layer = [], {}
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        groups, blocks = n // 16, k // 64
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = dict(shape=name, m=m, rule=nf4_cuda.matmul_geometry(n, k, sms))
            if previous:
                row["previous_rule"] = previous.matmul_geometry(n, k, sms)
                row["previous_ms"] = time_ms(lambda: run_previous(x, w))
            row["package_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters))
            sweep = []
            for tile in (2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32):
                for split in (1, 2, 4, 8, 16):
                    ctas = -(-groups // tile) * split
                    if blocks < 4 * split or not sms // 2 <= ctas <= 2 * sms:
                        continue
                    most = nf4_cuda.WARPS // (tile // nf4_cuda.GROUPS_PER_WARP)
                    for slices in sorted({1, most, max(1, most // 2)}):
                        sweep.append(dict(tile=tile, split=split, slices=slices,
                                          ms=time_ms(lambda: run(x, w, tile, split, slices))))
            sweep.sort(key=lambda r: r["ms"])
            row["sweep"] = sweep
            results.append(row)
            t = per_layer.setdefault(m, dict(previous=0.0, package=0.0, best=0.0))
            t["previous"] += row.get("previous_ms", 0.0)
            t["package"] += row["package_ms"]
            t["best"] += sweep[0]["ms"]
            print(f"{name} M={m}: previous {row.get('previous_ms', 0) * 1e3:.1f} us {row.get('previous_rule')}, package "
                  f"{row['package_ms'] * 1e3:.1f} {row['rule']}; best "
                  + ", ".join(f"{r['ms'] * 1e3:.1f} {r['tile']},{r['split']},{r['slices']}" for r in sweep[:5]), flush=True)
    for m, t in per_layer.items():
        print(f"per layer M={m}: previous {t['previous'] * 1e3:.1f} us, package {t['package'] * 1e3:.1f}, "
              f"best per shape {t['best'] * 1e3:.1f}", flush=True)
    write_record("nf4_ranges", failures=failures, results=results, per_layer=per_layer)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
