"""Experiment: the CUDA NF4 kernel's template at 16 and 32 rows with K ranges per CTA, against Triton.

    python bench/experiments/nf4_wide_ranges.py      # on an sm80+ GPU; writes $OUT/nf4_wide_ranges.json

nf4_wide.py found the template's 2- and 4-column-tile variants slower than the Triton kernel
at 16 / 32 rows, with K split across CTAs (partial sums through global memory, 4x larger at 32
rows than at 8). With the K ranges of `nf4_matmul_body` (a CTA's warps cut K and add their sums
in shared memory) this script checks the variants V on odd shapes and geometries, then sweeps
(groups per CTA, split, ranges) per decode shape at 16 and 32 rows beside the Triton kernel
and the package's own kernel for those rows (`nf4_cuda.nf4_matmul`: `INSTANCES`, `matmul_geometry`).

Results (H200, CUDA-graph replay with L2 flushed), nf4_wide_ranges_h200_2026-11-26.json (run
before the package had its 16- and 32-row kernels, so without package_ms): per layer at 16
rows 76.5 us for (2, 2, 4, 16) against Triton's 116.1; at 32 rows 116.8 for (4, 1, 4, 16) and
(4, 2, 4, 8) against 136.0 (q/o 12.2 vs 16.8, qkv 18.7 vs 19.4, gate_up 57.8 vs 63.3, down
28.1 vs 36.4). The package took (2, 2, 4, 16) and (4, 1, 4, 16) as its 16- and 32-row kernels;
its rule picks the sweep's best geometry per shape for both.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

V = [(2, 2, 4, 16), (4, 1, 4, 16), (4, 2, 4, 8)]  # (column tiles, groups per warp, ring, warps), as nf4_wide.py


def configs(v, groups, blocks, sms):
    """(groups per CTA, split, K ranges) worth timing for variant v: half a wave to two waves."""
    _, ng, _, warps = v
    for tile in range(2, warps * ng + 1, 2):
        for split in (1, 2, 4, 8):
            ctas = -(-groups // tile) * split
            if blocks < 4 * split or not sms // 2 <= ctas <= 2 * sms:
                continue
            most = warps // -(-tile // ng)
            for slices in sorted({1, most, max(1, most // 2)}):
                if blocks // split // slices >= 2:
                    yield tile, split, slices


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    import nf4_wide
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, check_matmul, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda, nf4_triton

    dev = torch.device("cuda")
    mod = nf4_cuda._Module(dev, nf4_wide.source(V))
    shared = nf4_cuda.matmul_shared_bytes(nf4_cuda.table_shared_bytes(mod))
    sms = multiprocessor_count(dev)
    time_ms = timer(dev)

    def run(x, w, v, tile, split, slices, out=None):
        m, k = x.shape
        n = w.packed.shape[0]
        out = torch.empty((m, n), dtype=torch.float16, device=dev) if out is None else out
        partial = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        mod.launch(nf4_wide.name(v), (-(-(n // 16) // tile), split), v[3] * 32,
                   [x, w.packed, w.absmax, w.code_fp16, out, partial, w.tile_counters, m, n, k, x.stride(0),
                    out.stride(0), split, tile, slices], shared=shared)
        return out

    failures = 0
    for n, k in [(96, 320), (1008, 4096), (4096, 14336)]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        ref_w = w.dequantize(torch.float32)
        for m in (13, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ ref_w.T
            for v in V:
                if m > 8 * v[0]:
                    continue
                for tile, split, slices in [(v[1] * 2, 1, v[3] // 2), (v[1] * 3, 2, 5 if v[3] == 16 else 2),
                                            (v[1] * v[3], 1, 1)]:
                    out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                    run(x, w, v, tile, split, slices, out)
                    failures += check_matmul(out, ref, w.tile_counters, f"{n} {k} {m} {v} {tile},{split},{slices}")
            out = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters)
            failures += check_matmul(out, ref, w.tile_counters, f"package {n} {k} {m}")
    print("failures", failures, flush=True)
    results, per_layer = [], {}
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        wt = NF4Weight.from_bnb(random_param(k, n, dev), backend="triton")
        for m in (16, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            triton_ms = time_ms(lambda: nf4_triton.nf4_matmul(x, wt.packed, wt.absmax, wt.code_fp16, wt.tile_counters, 64))
            package_ms = time_ms(lambda: nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters))
            rows = []
            for v in V:
                if nf4_wide.column_tiles(m) != v[0]:
                    continue
                for tile, split, slices in configs(v, n // 16, k // 64, sms):
                    rows.append(dict(v=v, tile=tile, split=split, slices=slices,
                                     ms=time_ms(lambda: run(x, w, v, tile, split, slices))))
            rows.sort(key=lambda r: r["ms"])
            results.append(dict(shape=name, m=m, triton_ms=triton_ms, package_ms=package_ms, rows=rows))
            t = per_layer.setdefault(m, dict(triton=0.0, package=0.0, best=0.0))
            t["triton"] += triton_ms
            t["package"] += package_ms
            t["best"] += rows[0]["ms"]
            print(f"{name} M={m}: triton {triton_ms * 1e3:.1f} us, package {package_ms * 1e3:.1f}; best "
                  + ", ".join(f"{r['ms'] * 1e3:.1f} {r['v']} {r['tile']},{r['split']},{r['slices']}" for r in rows[:4]),
                  flush=True)
    for m, t in per_layer.items():
        print(f"per layer M={m}: triton {t['triton'] * 1e3:.1f} us, package {t['package'] * 1e3:.1f}, "
              f"best variant per shape {t['best'] * 1e3:.1f}", flush=True)
    write_record("nf4_wide_ranges", failures=failures, results=results, per_layer=per_layer)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
