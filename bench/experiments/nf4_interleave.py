"""Experiment: do the CUDA NF4 kernel's memory access patterns limit it? Interleaved groups, rotated blocks.

    python bench/experiments/nf4_interleave.py     # on an sm80+ GPU; checks, then times; writes $OUT/nf4_interleave.json

In the package's fragment layout (`mistral_t4.kernels.nf4_cuda`) a row group's 64-weight blocks
are contiguous (512 bytes each), so each warp of the batch-1 kernel streams its 2 groups as 2
separate 512-byte-per-step streams: ~4,000 concurrent streams per matmul on 132 SMs. Here the
two groups of a warp are interleaved block by block (G / 2, b, G % 2), so a warp reads 1 KB
contiguous per step, one stream; the kernel is the package's template with only the weight and
scale addresses changed (string-substituted below). If DRAM page locality limits the weight
stream (Nsight Compute: DRAM 40% busy while the warps wait for their loads), this shows it.
Second kernel ("rotated"): the package's layout, but each warp walks its K blocks starting at
a different block (a hash of its first group), so that the warps' concurrent addresses are no
longer 32 KB apart (a power-of-two stride that could camp on a few memory partitions).

Results (H200, correct at 1 and 8 rows): first run (interleaved only) per layer at 1 row 65.7 us
(package) vs 64.6 (interleaved), at 8 rows 86.3 vs 86.4; second run (nf4_interleave_h200_2026-11-26.json)
66.4 / 64.3 / 69.7 (package / interleaved / rotated) at 1 row, 86.5 / 85.6 / 88.9 at 8. Interleaving
gains 2-3% at 1 row, rotating loses 5%: neither page locality nor partition camping is what holds
the weight stream back.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rotated_source():
    """The package's template with logical block b read at kb0 + (b - kb0 + rot) % blocks."""
    from mistral_t4.kernels import nf4_cuda

    body = nf4_cuda.SOURCE[nf4_cuda.SOURCE.index("template <int NT, int NG, int D, int WARPS, bool SWIGLU"):
                           nf4_cuda.SOURCE.index("#define NF4_KERNEL")]
    swaps = [("nf4_matmul_body", "nf4_rotated_body"),
             ("constexpr bool RUN = NT < 8;", "constexpr bool RUN = false;"),  # each address from b, as measured
             ("    const int g = lane >> 2, c = lane & 3;\n",
              "    const int g = lane >> 2, c = lane & 3;\n"
              "    const int nblk = max(kb1 - kb0, 1), rot = (int)(((u32)G0 * 2654435761u >> 7) % (u32)nblk);\n"
              "    auto P = [&](int b) { int j = b - kb0 + rot; return kb0 + (j >= nblk ? j - nblk : j); };\n"),
             ("ld_stream(wp[q] + (size_t)b * 32); sr[d][q] = ld_scales(sp[q] + (size_t)b * 8)",
              "ld_stream(wp[q] + (size_t)P(b) * 32); sr[d][q] = ld_scales(sp[q] + (size_t)P(b) * 8)"),
             ("ld_x_block(xp[nt], RUN ? 0 : b, xv[nt][0], xv[nt][1])", "ld_x_block(xp[nt], P(b), xv[nt][0], xv[nt][1])"),
             ("const size_t at = RUN ? 0 : b + D;", "const size_t at = P(b + D);")]
    for old, new in swaps:
        assert old in body, old
        body = body.replace(old, new)
    return body + f"""
extern "C" __global__ void __launch_bounds__({nf4_cuda.WARPS} * 32, 1) nf4_rotated(const u16* x, const uint4* wq,
        const u32* scales, const u16* code, u16* out, float* partial, int* counters, int M, int N, int K, int stride_xm,
        int stride_om, int split_k, int tile_groups) {{
    nf4_rotated_body<1, {nf4_cuda.GROUPS_PER_WARP}, 4, {nf4_cuda.WARPS}, false>(x, wq, scales, code, out, partial, counters,
        M, N, K, stride_xm, stride_om, split_k, tile_groups); }}
"""


def source():
    from mistral_t4.kernels import nf4_cuda

    body = nf4_cuda.SOURCE[nf4_cuda.SOURCE.index("template <int NT, int NG, int D, int WARPS, bool SWIGLU"):
                           nf4_cuda.SOURCE.index("#define NF4_KERNEL")]
    swaps = [("nf4_matmul_body", "nf4_interleaved_body"),
             ("constexpr bool RUN = NT < 8;", "constexpr bool RUN = false;"),  # each address from b, as measured
             ("wp[q] = wq + ((size_t)G * nb + (RUN ? kb0 : 0)) * 32 + lane;",
              "wp[q] = wq + ((size_t)(G / NG) * nb * NG + G % NG) * 32 + lane;"),
             ("sp[q] = scales + ((size_t)G * nb + (RUN ? kb0 : 0)) * 8 + g;",
              "sp[q] = scales + ((size_t)(G / NG) * nb * NG + G % NG) * 8 + g;"),
             ("ld_stream(wp[q] + (size_t)b * 32)", "ld_stream(wp[q] + (size_t)b * (NG * 32))"),
             ("ld_scales(sp[q] + (size_t)b * 8)", "ld_scales(sp[q] + (size_t)b * (NG * 8))"),
             ("ld_stream(wp[q] + at * 32)", "ld_stream(wp[q] + at * (NG * 32))"),
             ("ld_scales(sp[q] + at * 8)", "ld_scales(sp[q] + at * (NG * 8))")]
    for old, new in swaps:
        assert old in body, old
        body = body.replace(old, new)
    return nf4_cuda.SOURCE + rotated_source() + body + f"""
extern "C" __global__ void __launch_bounds__({nf4_cuda.WARPS} * 32, 1) nf4_interleaved(const u16* x, const uint4* wq,
        const u32* scales, const u16* code, u16* out, float* partial, int* counters, int M, int N, int K, int stride_xm,
        int stride_om, int split_k, int tile_groups) {{
    nf4_interleaved_body<1, {nf4_cuda.GROUPS_PER_WARP}, 4, {nf4_cuda.WARPS}, false>(x, wq, scales, code, out, partial, counters,
        M, N, K, stride_xm, stride_om, split_k, tile_groups); }}
"""


def interleave(packed, scales, ng):
    """Fragment layout (G, b) -> (G / ng, b, G % ng), for weights (512 bytes per block) and scales (16 per block)."""
    n, nb = scales.shape
    w = packed.view(n // 16 // ng, ng, nb, 512).permute(0, 2, 1, 3).contiguous().view_as(packed)
    s = scales.view(n // 16 // ng, ng, nb, 16).permute(0, 2, 1, 3).contiguous().view_as(scales)
    return w, s


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, random_param, rel_error, timer, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda

    dev = torch.device("cuda")
    mod = nf4_cuda._Module(dev, source())
    shared = nf4_cuda.table_shared_bytes(mod)
    time_ms = timer(dev)
    sms = multiprocessor_count(dev)

    def run(x, w, packed, scales, tile, split, kernel="nf4_interleaved"):
        m, k = x.shape
        n = packed.shape[0]
        out = torch.empty((m, n), dtype=torch.float16, device=dev)
        partial = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        mod.launch(kernel, (-(-(n // 16) // tile), split), 32 * nf4_cuda.WARPS,
                   [x, packed, scales, w.code_fp16, out, partial, w.tile_counters, m, n, k, x.stride(0), out.stride(0),
                    split, tile], shared=shared)
        return out

    failures, results, totals = 0, [], {}
    for shape, k, n in [("check 1024->4096", 4096, 1024)] + [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        packed, scales = interleave(w.packed, w.absmax, nf4_cuda.GROUPS_PER_WARP)
        tile, split, _ = nf4_cuda.matmul_geometry(n, k, sms, ranges=False)  # its kernels: one K range per CTA
        ref_w = w.dequantize(torch.float32)
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            err = rel_error(run(x, w, packed, scales, tile, split), x.float() @ ref_w.T)
            err_rotated = rel_error(run(x, w, w.packed, w.absmax, tile, split, "nf4_rotated"), x.float() @ ref_w.T)
            if not (err < 1e-3 and err_rotated < 1e-3):
                failures += 1
                print(f"WRONG {shape} m={m}: {err} {err_rotated}", flush=True)
            if shape.startswith("check"):
                continue
            row = dict(shape=shape, m=m, tile_groups=tile, split_k=split, err=err,
                       package_ms=time_ms(lambda: nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters)),
                       interleaved_ms=time_ms(lambda: run(x, w, packed, scales, tile, split)),
                       rotated_ms=time_ms(lambda: run(x, w, w.packed, w.absmax, tile, split, "nf4_rotated")))
            results.append(row)
            t = totals.setdefault(m, [0.0, 0.0, 0.0])
            t[0] += row["package_ms"]
            t[1] += row["interleaved_ms"]
            t[2] += row["rotated_ms"]
            print(f"{shape} M={m}: package {row['package_ms'] * 1e3:.1f} us, interleaved {row['interleaved_ms'] * 1e3:.1f}, "
                  f"rotated {row['rotated_ms'] * 1e3:.1f}", flush=True)
    for m, (a, b, r) in totals.items():
        print(f"per layer M={m}: package {a * 1e3:.1f} us, interleaved {b * 1e3:.1f}, rotated {r * 1e3:.1f}", flush=True)
    write_record("nf4_interleave", failures=failures, results=results, per_layer=totals)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
