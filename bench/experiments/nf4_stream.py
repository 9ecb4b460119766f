"""Experiment: how fast does the batch-1 kernel's weight stream go without its arithmetic?

    python bench/experiments/nf4_stream.py      # on an sm80+ GPU; writes $OUT/nf4_stream.json

The package's CUDA NF4 kernel (`mistral_t4.kernels.nf4_cuda`) moves 1.9 TB/s at 1 row, 40% of
the DRAM's peak, and Nsight Compute says it waits for its weight loads. This script keeps the
kernel's loads exactly (the same tiles and splits from `nf4_tile` / `matmul_geometry`, the
same ring of 128-bit weight loads, the scale pairs and x) and replaces what it does with them:
  * MODE 0: the loaded words are xor-folded into one register (loads only),
  * MODE 1: each weight pair also goes through the table (prmt + shared load), as the kernel,
and runs MODE 0 with one CTA per SM (the package's 127 KB of shared memory) and without
(several CTAs per SM), beside the package's kernel, a read-only reduction over the same bytes
(torch.sum: what a plain stream reaches) and fp16 cuBLAS at 1 row on the dense weight.
GB/s counts NF4 bytes + fp32 scales. If MODE 0 at one CTA per SM is as slow as the kernel, the
access pattern / bytes in flight are the limit; if it is fast, the arithmetic is.

Results (H200, CUDA-graph replay with L2 flushed; per layer = qkv + o + gate_up + down at 1 row):
  * nf4_stream_previous_geometry_h200_2026-11-26.json (841fbb9: one K range per CTA): package
    66.9 us, loads only 48.5 (ring of 8: 50.6; 2 CTAs per SM: 53.5), loads + table 57.7,
    torch.sum over the same bytes 58.4, fp16 cuBLAS on the dense weight (4x the bytes) 114.5.
    Even the bare loads reach only 1.8-2.8 TB/s (gate_up 2.8, q/o 1.8): a 4-58 MB kernel spends
    microseconds filling and draining the memory pipeline; the table costs ~9 us per layer,
    the MMAs, scaling and split-K ~9 more.
  * nf4_stream_h200_2026-11-26.json (K ranges per CTA): package 65.3, loads only 49.1, loads +
    table 57.1, torch.sum 59.6.
So at 1 row three quarters of the kernel's time is the bare stream; what would close more is
overlapping the kernels' starts and ends (programmatic dependent launch, or one persistent
kernel per layer), not the arithmetic.
  * nf4_stream_block_major_h100_2026-11-27.json (H100, fp32 scales; BMAJOR: the chunks of one K block
    of every group side by side, so that the warps' concurrent loads are near each other): loads only
    59.4 -> 57.6 us per layer, loads + table 63.3 -> 65.0; within the noise, so DRAM page locality is not
    the limit either. The same run's package 73.2, torch.sum 70.4, and fp16 cuBLAS on the dense weight
    3.0-3.2 TB/s at 4x the bytes (longer kernels amortize their start and end).
Fewer bytes did pay: scales in fp16 instead of fp32 (1/8 -> 1/16 of the stream) made a decode step at
1 row 4.8% faster (the package since s15; this script's loads follow the package's: fp16 pairs).
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

STREAM = r"""
// The loads of nf4_matmul_body<1, NG, D, WARPS> (same tile, ring, scale pairs, x), their words folded.
// BMAJOR: the chunk of (G, b) at b * N / 16 + G instead of G * nb + b (the groups of one K block side by side)
template <int NG, int D, int WARPS, int MODE, bool BMAJOR = false>
__device__ __forceinline__ void nf4_stream_body(
        const u16* __restrict__ x, const uint4* __restrict__ wq, const u32* __restrict__ scales,
        const u16* __restrict__ code, u32* __restrict__ sink, int M, int N, int K, int stride_xm, int split_k,
        int tile_groups, int slices) {
    extern __shared__ __align__(16) unsigned char window[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    u32 lane_base = 0;
    if (MODE == 1) {
        const u32 base = (u32)__cvta_generic_to_shared(window);
        const u32 table = (base + 0xFFFFu) & ~0xFFFFu;
        for (int i = tid; i < 2048; i += WARPS * 32) {
            const int b = i >> 3;
            const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);
            asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};" :: "r"(table + b * 256 + (i & 7) * 16), "r"(v));
        }
        __syncthreads();
        lane_base = table | (lane << 2);
    }
    const Nf4Tile tile = nf4_tile<NG>(N, K, split_k, tile_groups, warp, slices, WARPS / slices);
    const int end = tile.end, G0 = tile.G0, nb = tile.nb, kb0 = tile.kb0, kb1 = tile.kb1;
    const int g = lane >> 2, c = lane & 3;
    u32 acc = 0;
    if (G0 < end) {
        const uint4* wp[NG];
        const u32* sp[NG];
        #pragma unroll
        for (int q = 0; q < NG; q++) {
            const int G = min(G0 + q, end - 1);
            wp[q] = wq + (size_t)G * (BMAJOR ? 1 : nb) * 32 + lane;
            sp[q] = scales + (size_t)G * (BMAJOR ? 1 : nb) * 8 + g;
        }
        const size_t step = BMAJOR ? (size_t)(N >> 4) : 1;  // chunks from one K block to the next
        const uint4* xp = x_lane(x, min(g, M - 1), stride_xm, c);
        uint4 wr[D][NG];
        u32 sr[D][NG];
        #pragma unroll
        for (int d = 0; d < D; d++) {
            const int b = kb0 + d;
            if (b < kb1) {
                #pragma unroll
                for (int q = 0; q < NG; q++) { wr[d][q] = ld_stream(wp[q] + b * step * 32); sr[d][q] = ld_scales(sp[q] + b * step * 8); }
            }
        }
        for (int b0 = kb0; b0 < kb1; b0 += D) {
            #pragma unroll
            for (int d = 0; d < D; d++) {
                const int b = b0 + d;
                if (b < kb1) {
                    uint4 x0, x1;
                    ld_x_block(xp, b, x0, x1);
                    acc ^= x0.x ^ x0.y ^ x0.z ^ x0.w ^ x1.x ^ x1.y ^ x1.z ^ x1.w;
                    #pragma unroll
                    for (int q = 0; q < NG; q++) {
                        #pragma unroll
                        for (int t = 0; t < 4; t++) {
                            const u32 w = word(wr[d][q], t);
                            if (MODE == 0) acc = acc * 3u + w;
                            else acc = acc * 3u + (lds(prmt(w, lane_base, 0x7604)) ^ lds(prmt(w, lane_base, 0x7614))
                                                   ^ lds(prmt(w, lane_base, 0x7624)) ^ lds(prmt(w, lane_base, 0x7634)));
                        }
                        acc += sr[d][q];
                    }
                    if (b + D < kb1) {
                        #pragma unroll
                        for (int q = 0; q < NG; q++) { wr[d][q] = ld_stream(wp[q] + (b + D) * step * 32); sr[d][q] = ld_scales(sp[q] + (b + D) * step * 8); }
                    }
                }
            }
        }
    }
    if (acc == 0x9E3779B9u) sink[blockIdx.y * gridDim.x * WARPS * 32 + blockIdx.x * WARPS * 32 + tid] = acc;  // keeps the loads
}
#define NF4_STREAM(NAME, NG, D, WARPS, MODE, CTAS, ...) \
extern "C" __global__ void __launch_bounds__(WARPS * 32, CTAS) NAME(const u16* x, const uint4* wq, const u32* scales, \
        const u16* code, u32* sink, int M, int N, int K, int stride_xm, int split_k, int tile_groups, int slices) { \
    nf4_stream_body<NG, D, WARPS, MODE, ##__VA_ARGS__>(x, wq, scales, code, sink, M, N, K, stride_xm, split_k, tile_groups, slices); }
NF4_STREAM(stream_loads, 2, 4, 16, 0, 1)
NF4_STREAM(stream_loads_d8, 2, 8, 16, 0, 1)
NF4_STREAM(stream_loads_2cta, 2, 4, 16, 0, 2)
NF4_STREAM(stream_table, 2, 4, 16, 1, 1)
NF4_STREAM(stream_loads_bmajor, 2, 4, 16, 0, 1, true)
NF4_STREAM(stream_table_bmajor, 2, 4, 16, 1, 1, true)
"""

# (label, kernel, with the package's 127 KB of shared memory: one CTA per SM); tiles and splits: matmul_geometry
VARIANTS = [
    ("loads, 1 CTA/SM", "stream_loads", True),
    ("loads, ring 8, 1 CTA/SM", "stream_loads_d8", True),
    ("loads, 2 CTAs/SM", "stream_loads_2cta", False),
    ("loads + table, 1 CTA/SM", "stream_table", True),
    ("loads, block-major layout, 1 CTA/SM", "stream_loads_bmajor", True),
    ("loads + table, block-major layout, 1 CTA/SM", "stream_table_bmajor", True),
]


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda

    dev = torch.device("cuda")
    mod = nf4_cuda._Module(dev, nf4_cuda.SOURCE + STREAM)
    shared = nf4_cuda.table_shared_bytes(mod)
    time_ms = timer(dev)
    sms = multiprocessor_count(dev)
    sink = torch.zeros(1 << 20, dtype=torch.int32, device=dev)
    results, totals = [], {}
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        p = random_param(k, n, dev)
        w = NF4Weight.from_bnb(p, backend="cuda")
        dense = w.dequantize(torch.float16)
        nbytes = w.packed.numel() + w.absmax.nbytes
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        tile_groups, split, slices = nf4_cuda.matmul_geometry(n, k, sms)
        flat = torch.cat([w.packed.view(-1), w.absmax.view(torch.uint8).view(-1)]).view(torch.float32)

        def launch(kernel, one_cta):
            grid = (-(-(n // 16) // tile_groups), split)
            mod.launch(kernel, grid, 512, [x, w.packed, w.absmax, w.code_fp16, sink, 1, n, k, x.stride(0), split,
                                           tile_groups, slices], shared=shared if one_cta else 0)

        row = dict(shape=name, n=n, k=k, bytes=nbytes, tile_groups=tile_groups, split=split, slices=slices)
        row["package"] = time_ms(lambda: nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters))
        for label, kernel, one_cta in VARIANTS:
            row[label] = time_ms(lambda: launch(kernel, one_cta))
        row["torch.sum over the same bytes"] = time_ms(lambda: torch.sum(flat))
        row["fp16 cuBLAS, dense weight (4x bytes)"] = time_ms(lambda: x @ dense.T)
        results.append(row)
        for key, v in row.items():
            if isinstance(v, float):
                b = nbytes * (4 if key.startswith("fp16") else 1)
                totals[key] = totals.get(key, 0.0) + v
                print(f"{name:24s} {key:40s} {v * 1e3:7.1f} us {b / v / 1e6:6.0f} GB/s", flush=True)
    for key, v in totals.items():
        print(f"per layer {key:40s} {v * 1e3:7.1f} us", flush=True)
    write_record("nf4_stream", results=results, per_layer_ms=totals)


if __name__ == "__main__":
    main()
