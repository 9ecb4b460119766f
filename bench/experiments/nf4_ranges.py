"""Experiment: the CUDA NF4 kernel with K ranges per CTA, 1 to 32 rows, against Triton and an older version.

    python bench/experiments/nf4_ranges.py [--previous OLD/nf4_cuda.py] [--rows 8,32,64]   # sm80+; writes $OUT/nf4_ranges.json

The package's kernel (`mistral_t4.kernels.nf4_cuda`) lets a CTA's warps cut its K blocks into
ranges (`slices`) whose sums meet in shared memory, instead of splitting K across CTAs whose
partial sums go through global memory to the last CTA of a tile; and it sends the ring's first
weight loads before building its table. This script instantiates the kernel's template for V
(the package's 8-row kernel and variants for 16 / 32 / 64 rows, as nf4_wide.py), checks them on odd
shapes, tiles, splits and ranges, then times every decode shape at 1, 8, 16, 32 and 64 rows: the
package's `nf4_matmul` (its `kernel_for` and `matmul_geometry`), a sweep of (groups per CTA,
split, ranges) per variant, the Triton kernel, and the kernel of `--previous` (another version's
nf4_cuda.py, e.g. from `git show REV:src/...`) under its own rule (times only: it reads the
fragments of this version's layout). At 64 rows (where the package takes Triton) only the
sweep: (8, 2, 2, 8) and (8, 2, 1, 8) are candidates for a 64-row kernel; (4, 2, 3, 12) tries 12
warps of 2 groups at 32 rows. (Since session 8 the package has (8, 2, 2, 8) as `nf4_matmul64`
and times it at 64 rows too.)

Results (H200, CUDA-graph replay with L2 flushed):
  * nf4_ranges_h200_2026-11-26.json (previous = 841fbb9's kernel, one K range per CTA, keyed
    "head"): per layer at 8 rows 86.6 -> 68.7 us (o 14.6 -> 8.3, qkv 15.0 -> 11.2, gate_up
    34.4 -> 30.7, down 22.6 -> 18.5), at 1 row 65.7 -> 64.9; the rule's choice is the sweep's
    best or within 2% per shape. Batch-1 decode did not change (2.674 / 2.677 ms/token before,
    2.672 after); 8 requests x 128 -> 128 tokens: 3.22 -> 2.76 ms per step, 2,144 -> 2,500
    output tokens/s (bench/results/h200_2026-11-26_s6_ranges/).
  * nf4_wide_ranges_h200_2026-11-26.json (before the package had its 16- and 32-row kernels):
    per layer at 16 rows 76.5 us for (2, 2, 4, 16) against Triton's 116.1; at 32 rows 116.8 for
    (4, 1, 4, 16) / (4, 2, 4, 8) against 136.0 (q/o 12.2 vs 16.8, qkv 18.7 vs 19.4, gate_up 57.8
    vs 63.3, down 28.1 vs 36.4). The package took (2, 2, 4, 16) and (4, 1, 4, 16); its rule
    picks the sweep's best geometry per shape for both.
  * nf4_ranges_x_sectors_h200_2026-11-26.json (this merged script, V with the wide (4, 4, 2, 8);
    package = a trial fragment order whose x loads use whole sectors, previous = c85eecc; the
    order changed nothing measurable and was dropped): per layer 1 / 8 / 16 / 32 rows Triton
    108.9 / 112.8 / 116.1 / 136.3 us, c85eecc 64.7 / 67.8 / 76.1 / 117.2. At 32 rows (4, 4, 2, 8)
    takes qkv 17.7 (4, 1, 8) and gate_up 47.6 (16, 1, 2) / 48.5 (14, 1, 2) against 19.6 / 57.4 for
    the package's (4, 1, 4, 16); o and down stay with it. The package took it for N >= 2 groups
    per SM (`nf4_cuda.kernel_for`).
  * nf4_ranges_rows64_h200_2026-11-27.json (the 12-warp and 64-row candidates): at 64 rows
    (8, 2, 2, 8) 15.5 / 25.2 / 77.7 / 38.5 us for o / qkv / gate_up / down against Triton's
    19.7 / 24.4 / 78.7 / 46.6 (per layer 156.9 vs 169.4), with the geometries the package's rule
    gives; (8, 2, 1, 8) the same within 1%. The package took (8, 2, 2, 8): 64 requests 8,080 ->
    8,525 output tok/s (bench/results/h200_2026-11-27_s8_rows64/). At 32 rows (4, 2, 3, 12) gains
    only on down (27.0 vs 28.4 us) and loses on gate_up (55.4 vs 48.8): not taken.
  * nf4_ranges_xslots_h200_2026-11-27.json (the trial at commit ff5a831, whose template had a fifth
    parameter XS: x reaching the warps through XS slots per warp in shared memory, filled by cp.async
    XS - 1 blocks ahead, instead of loads from global memory at the start of each block; --rows 8,32,64):
    is the 32-row kernel waiting on x? Hardly. Per layer at 32 rows the sweep's best 104.0 us against
    the package's 106.8 (qkv 17.0 vs 17.5, gate_up 48.1 vs 48.7 with 3 slots; down 26.8 vs 28.4 with
    12 warps of 2 groups and 2 slots); at 8 rows the same within 1%; at 64 rows one slot (no lead)
    loses (18.8 vs 15.8 us on o). 2.6% at 32 rows for two more kernels: not taken.
  * nf4_ranges_scale_a_h200_2026-11-27.json (`--rows 16,32,64 --variants ...`; a fifth value 1 = the
    package's `scale_a`: the looked-up weights times their absmax in fp16, the MMAs straight into the
    accumulators): per layer at 32 rows the package's 106.8 us against 101.7 for (4, 2, 4, 12, 1) on o
    and down (12.3 / 25.5 vs 12.5 / 28.4) and (4, 4, 2, 8, 1) on qkv and gate_up (17.0 / 46.9 vs 17.5 /
    48.5); at 16 and 64 rows no gain (76.0 vs 76.8; 155.4 vs 158.0 for the best scale_a per shape where
    all four take it). The package took both 32-row variants (bench/results/h200_2026-11-27_s10_scale_a/).
"""
import argparse
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# (column tiles, groups per warp, ring, warps), as nf4_wide.py: the package's 8-row kernel first
V = [(1, 2, 4, 16), (2, 2, 4, 16), (4, 1, 4, 16), (4, 2, 4, 8), (4, 4, 2, 8),
     (4, 2, 3, 12),  # 32 rows, 12 warps of 2 groups (165 registers): more warps to hide latency than the wide kernel
     (8, 2, 2, 8), (8, 2, 1, 8)]  # 64 rows (255 / 247 registers)
ROWS = (1, 8, 16, 32, 64)


def configs(v, groups, blocks, sms):
    """(groups per CTA, split, K ranges) worth timing for variant v: half a wave to two waves."""
    ng, warps = v[1], v[3]
    for tile in range(2, warps * ng + 1, 2):
        for split in (1, 2, 4, 8, 16):
            ctas = -(-groups // tile) * split
            if blocks < 4 * split or not sms // 2 <= ctas <= 2 * sms:
                continue
            most = warps // -(-tile // ng)
            for slices in sorted({1, most, max(1, most // 2)}):
                if blocks // split // slices >= 2:
                    yield tile, split, slices


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--previous", help="another version's nf4_cuda.py to time beside the package's kernel")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x to time, e.g. 8,32,64")
    parser.add_argument("--variants", help="the template's variants instead of V, e.g. '4,4,2,8;4,4,2,8,1' "
                                           "(a fifth value 1: weights scaled in fp16 before the MMAs)")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    global V
    if args.variants:
        V = [tuple(int(value) for value in v.split(",")) for v in args.variants.split(";")]
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    import nf4_wide
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, check_matmul, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda, nf4_triton

    dev = torch.device("cuda")
    mod = nf4_cuda._Module(dev, nf4_wide.source(V))
    table_shared = nf4_cuda.table_shared_bytes(mod)
    shared = {v: nf4_cuda.matmul_shared_bytes(table_shared, v[3] * v[1] * v[0] * 512) for v in V}  # + the ranges' sums
    sms = multiprocessor_count(dev)
    time_ms = timer(dev)
    previous = None
    if args.previous:
        spec = importlib.util.spec_from_file_location("previous_nf4_cuda", args.previous)
        previous = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(previous)
        previous.mod = previous._Module(dev, previous.SOURCE)
        previous.table_shared = previous.table_shared_bytes(previous.mod)

    def launch(kernels, name, warps, shared_bytes, x, w, tile, split, extra, out=None):
        m, k = x.shape
        n = w.packed.shape[0]
        out = torch.empty((m, n), dtype=torch.float16, device=dev) if out is None else out
        partial = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        kernels.launch(name, (-(-(n // 16) // tile), split), 32 * warps,
                       [x, w.packed, w.absmax, w.code_fp16, out, partial, w.tile_counters, m, n, k, x.stride(0),
                        out.stride(0), split, tile] + extra, shared=shared_bytes)
        return out

    def run(x, w, v, tile, split, slices, out=None):
        return launch(mod, nf4_wide.name(v), v[3], shared[v], x, w, tile, split, [slices], out)

    def run_previous(x, w):  # the previous version's kernel under its rule (times only: its fragment order may differ)
        n, (m, k) = w.packed.shape[0], x.shape
        if not hasattr(previous, "INSTANCES"):  # before K ranges (841fbb9): one kernel of 8 rows, one range per CTA
            tile, split = previous.matmul_geometry(n, k, sms)[:2]
            return launch(previous.mod, "nf4_matmul", 16, previous.table_shared, x, w, tile, split, [])
        name, _, groups_per_warp = previous.INSTANCES[min(r for r in previous.INSTANCES if r >= m)]
        tile, split, slices = previous.matmul_geometry(n, k, sms, groups_per_warp=groups_per_warp)
        return launch(previous.mod, name, previous.WARPS, previous.matmul_shared_bytes(previous.table_shared), x, w,
                      tile, split, [slices])

    failures = 0
    for n, k in [(96, 320), (48, 192), (1008, 4096), (4096, 14336), (6144, 4096)]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        ref_w = w.dequantize(torch.float32)
        for m in (1, 5, 8, 13, 32, 47, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ ref_w.T
            for v in V:
                if m > 8 * v[0]:
                    continue
                ng, warps = v[1], v[3]
                for tile, split, slices in [(2 * ng, 1, 16), (3 * ng, 2, 5), (ng * warps, 1, 1), (2 * ng, 3, 16),
                                            (5 * ng, 1, 3)]:
                    slices = min(slices, warps // -(-tile // ng))  # as many ranges as the warps hold
                    out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                    run(x, w, v, tile, split, slices, out)
                    failures += check_matmul(out, ref, w.tile_counters, f"n={n} k={k} m={m} {v} {tile},{split},{slices}")
            if m <= nf4_cuda.MAX_ROWS:
                out = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters)
                failures += check_matmul(out, ref, w.tile_counters, f"package n={n} k={k} m={m}")
    print("failures", failures, flush=True)
    results, per_layer = [], {}
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        wt = NF4Weight.from_bnb(random_param(k, n, dev), backend="triton")
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = dict(shape=name, m=m)
            row["triton_ms"] = time_ms(lambda: nf4_triton.nf4_matmul(x, wt.packed, wt.absmax, wt.code_fp16,
                                                                     wt.tile_counters, 64))
            if m <= nf4_cuda.MAX_ROWS:  # the package's kernels stop at 32 rows (above: Triton)
                kernel, *rule = nf4_cuda.launch_plan(m, n, k, sms)
                row.update(kernel=kernel.name, rule=tuple(rule))
                row["package_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16,
                                                                        w.tile_counters))
            if previous and (m <= 8 or hasattr(previous, "INSTANCES") and m <= previous.MAX_ROWS):
                row["previous_ms"] = time_ms(lambda: run_previous(x, w))
            sweep = []
            for v in V:
                if nf4_wide.column_tiles(m) != v[0]:
                    continue
                for tile, split, slices in configs(v, n // 16, k // 64, sms):
                    sweep.append(dict(v=v, tile=tile, split=split, slices=slices,
                                      ms=time_ms(lambda: run(x, w, v, tile, split, slices))))
            sweep.sort(key=lambda r: r["ms"])
            row["sweep"] = sweep
            results.append(row)
            t = per_layer.setdefault(m, dict(triton=0.0, package=0.0, previous=0.0, best=0.0))
            for key in ("triton", "package", "previous"):
                t[key] += row.get(f"{key}_ms", 0.0)
            t["best"] += sweep[0]["ms"]
            print(f"{name} M={m}: triton {row['triton_ms'] * 1e3:.1f} us, previous {row.get('previous_ms', 0) * 1e3:.1f}, "
                  f"package {row.get('package_ms', 0) * 1e3:.1f} {row.get('rule')}; best "
                  + ", ".join(f"{r['ms'] * 1e3:.1f} {r['v']} {r['tile']},{r['split']},{r['slices']}" for r in sweep[:4]),
                  flush=True)
    for m, t in per_layer.items():
        print(f"per layer M={m}: " + ", ".join(f"{key} {value * 1e3:.1f} us" for key, value in t.items()), flush=True)
    write_record("nf4_ranges", failures=failures, results=results, per_layer=per_layer)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
