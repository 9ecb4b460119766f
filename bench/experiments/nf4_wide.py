"""Experiment: variants of the package's CUDA NF4 kernel (one-instruction table address), 1..32 rows.

    python bench/experiments/nf4_wide.py      # on an sm80+ GPU; checks, then times; writes $OUT/nf4_wide.json

The kernel of `mistral_t4.kernels.nf4_cuda` (see its docstring: the table address of a weight
pair is one `prmt`, the table a 64 KB aligned block of the CTA's shared window) is a template
over NT column tiles of 8 rows (M <= 8 NT), NG weight groups of 16 rows per warp sharing the x
fragments, a ring of D blocks of weight loads per warp and WARPS warps per CTA (one table
each); this script instantiates VARIANTS from the package's source, checks them on odd shapes
and splits, and times them per decode shape and split against the package's instance (1, 2,
4, 16 with its split rule) and the Triton kernel.

Results (H200, CUDA-graph replay with L2 flushed):
  * nf4_wide_vs_previous_kernel_h200_2026-11-26.json (the first version of this script, its
    kernel then a copy, against the package's previous kernel: shift-and-mask address, 32 KB
    table, 4 warps per CTA): per layer at 1 row 67.5 us vs 84.9 (Triton 108.7), at 8 rows
    88.0 vs 95.7 (Triton 113.5); at 16 rows 115.8 vs Triton 116.8, at 32 rows 153.5 vs 136.0.
  * nf4_wide_h200_2026-11-26.json (this script): the package's instance 67.2 us per layer at
    1 row, 89.8 at 8; the best variant per shape 66.5 / 86.6: 16 warps of 2 groups and a ring
    of 4 are within 1-2% of the best everywhere at 1 row. 32 rows: 154.7 vs Triton 135.1.
  * nf4_wide_l2_prefetch_h200_2026-11-26.json (this script at e26ab13, whose template had a
    fifth parameter PF): `prefetch.global.L2` of the weights 8-32 blocks ahead of the ring
    gains nothing, PF = 0 is the best or within 2% per shape; removed again.
    Nsight Compute on gate_up at 1 row (package instance): DRAM 40% of peak (1.9 TB/s), 16
    warps per SM, 0.52 eligible per scheduler, half the stalls on L1TEX (global) scoreboards.
  * nf4_wide_cache_policies_h200_2026-11-26.json (this script at edb10fe, template parameter LD):
    the weight loads' cache policy (.nc / .cg / .cs / L1::no_allocate / L2::256B) changes
    nothing (within 2%). Nsight Compute's source view shows why the kernel waits: half of its
    stall samples sit on the first byte permute of each block, waiting for the ring's weight
    load (long scoreboard); with 64 KB in flight per SM at 1.9 TB/s, a load takes ~4.4 us.
  * nf4_wide_any_split_h200_2026-11-26.json (edb10fe): splits 1..16 for the package's variant;
    a grid short of one wave (qkv: 96 CTAs on 132 SMs) loses, a second wave loses more.
  * nf4_wide_geometry_h200_2026-11-26.json (this script): 16-32 row groups per CTA (runtime
    `tile_groups`) x power-of-two splits; the package's rule (`matmul_geometry`) picks the best
    or within 1% per shape: per layer 66.6 us at 1 row, 86.2 at 8 (32 groups per CTA: 67.0 /
    89.6 in the cache-policy run); batch-1 decode 2.70 -> 2.68 ms/token
    (bench/results/h200_2026-11-26_s5_geometry/).
  * nf4_wide_8warps_h200_2026-11-26.json (this script with VARIANTS set to 8-warp CTAs of up to
    255 registers: (4, 4, 4, 8), (4, 4, 2, 8), (4, 3, 4, 8), (4, 2, 4, 8), (2, 4, 4, 8), (2, 2,
    4, 8)): more groups per warp share x but no variant beats Triton at 16 or 32 rows (per
    layer best 128.8 / 154.9 us vs 116.3 / 135.4).
At 32 rows x is the limit: each warp reloads 32 rows x 64 k of x (4 KB, from L1) for every
1-2 groups of weights (1-2 KB); more groups per warp run out of registers (NT=4, NG=4: 249).
"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# (NT, NG, D, WARPS); the package's variant is also timed at 16-32 row groups per CTA
PACKAGE = (1, 2, 4, 16)
VARIANTS = [PACKAGE, (1, 1, 4, 16), (1, 1, 4, 32), (2, 1, 4, 16), (4, 1, 4, 16)]


def source(variants=VARIANTS):
    """The package's kernel source, its template instantiated for each variant: (NT, NG, D, WARPS), and a fifth
    value 1 for the package's `scale_a` (weights scaled in fp16 before the MMAs)."""
    from mistral_t4.kernels import nf4_cuda

    return nf4_cuda.SOURCE + "".join(
        nf4_cuda.instance(nf4_cuda.Kernel(name(v), 8 * v[0], *v[:4], scale_a=bool(v[4:] and v[4]))) for v in variants)


def name(v):
    return "nf4_wide_" + "_".join(map(str, v))


def column_tiles(m):
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


class Wide:
    def __init__(self, variants=VARIANTS):
        from mistral_t4.kernels import nf4_cuda

        self.mod = nf4_cuda._Module(torch.device("cuda"), source(variants))
        self.shared = nf4_cuda.table_shared_bytes(self.mod)

    def registers(self, v):
        import ctypes

        count = ctypes.c_int()
        self.mod.cuda.cuFuncGetAttribute(ctypes.byref(count), 4, self.mod.function(name(v)))
        return count.value

    def matmul(self, x, w, split_k, v, out=None, tile_groups=None):
        """tile_groups: row groups per CTA (default: all its warps' groups, WARPS x NG)."""
        nt, ng, d, warps = v
        m, k = x.shape
        n = w.packed.shape[0]
        assert m <= 8 * nt
        tile_groups = tile_groups or warps * ng
        if out is None:
            out = torch.empty((m, n), dtype=torch.float16, device=x.device)
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
        tiles = -(-(n // 16) // tile_groups)
        self.mod.launch(name(v), (tiles, split_k), warps * 32,
                        [x, w.packed, w.absmax, w.code_fp16, out, partial, w.tile_counters, m, n, k, x.stride(0),
                         out.stride(0), split_k, tile_groups, 1], shared=self.shared)  # one K range per CTA
        return out


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, check_matmul, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, nf4_cuda, nf4_triton

    start = time.time()
    wide = Wide()
    print(f"compiled in {time.time() - start:.1f} s; {wide.shared} bytes of shared memory per CTA",
          flush=True)
    print("registers:", [(v, wide.registers(v)) for v in VARIANTS], flush=True)
    dev = torch.device("cuda")
    time_ms = timer(dev)
    failures = 0
    for n, k in [(96, 320), (48, 192), (1008, 4096), (4096, 14336)]:
        p = random_param(k, n, dev)
        w = NF4Weight.from_bnb(p, backend="cuda")
        ref_w = w.dequantize(torch.float32)
        for m in (1, 3, 8, 13, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ ref_w.T
            for split_k in (1, 3, 8):
                for v in VARIANTS:
                    if m > 8 * v[0]:
                        continue
                    for tile in (None, 17, 22) if v == PACKAGE else (None,):  # odd tiles: warps half full, idle
                        out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                        wide.matmul(x, w, split_k, v, out=out, tile_groups=tile)
                        failures += check_matmul(out, ref, w.tile_counters, f"n={n} k={k} m={m} split={split_k} {v} x{tile}")
        print(f"checked N={n} K={k}", flush=True)
    results, per_layer = [], {}
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        p = random_param(k, n, dev)
        wc = NF4Weight.from_bnb(p, backend="cuda")
        wt = NF4Weight.from_bnb(p, backend="triton")
        for m in (1, 8, 16, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = dict(shape=name, m=m, triton_ms=time_ms(lambda: nf4_triton.nf4_matmul(x, wt.packed, wt.absmax, wt.code_fp16, wt.tile_counters, 64)))
            if m <= 8:  # the package's instance and split rule
                row["package_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(x, wc.packed, wc.absmax, wc.code_fp16, wc.tile_counters))
            rows = []
            for split_k in (1, 2, 4, 8, 16):
                for v in VARIANTS:
                    if v[0] != column_tiles(m):
                        continue
                    for tile in (16, 20, 24, 28, 32) if v == PACKAGE else (v[1] * v[3],):
                        rows.append(dict(ms=time_ms(lambda: wide.matmul(x, wc, split_k, v, tile_groups=tile)),
                                         split_k=split_k, variant=v, tile_groups=tile))
            rows.sort(key=lambda r: r["ms"])
            row["wide"] = rows
            results.append(row)
            best = rows[0]
            t = per_layer.setdefault(m, dict(triton=0.0, package=0.0, wide=0.0))
            t["triton"] += row["triton_ms"]
            t["package"] += row.get("package_ms", 0.0)
            t["wide"] += best["ms"]
            print(f"{name} M={m}: triton {row['triton_ms'] * 1e3:.1f} us, package {row.get('package_ms', 0) * 1e3:.1f}, "
                  f"wide {best['ms'] * 1e3:.1f} (split {best['split_k']} {best['variant']} x{best['tile_groups']}); next "
                  + ", ".join(f"{r['ms'] * 1e3:.1f} {r['split_k']} {r['variant']} x{r['tile_groups']}" for r in rows[1:4]),
                  flush=True)
    for m, t in per_layer.items():
        print(f"per layer M={m}: triton {t['triton'] * 1e3:.1f} us, package {t['package'] * 1e3:.1f}, "
              f"best variant per shape {t['wide'] * 1e3:.1f}",
              flush=True)
    write_record("nf4_wide", shared_bytes=wide.shared, failures=failures, results=results, per_layer=per_layer)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
