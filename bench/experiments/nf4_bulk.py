"""Experiment: the package's CUDA NF4 kernel with its weight ring in shared memory, filled by TMA bulk copies.

    python bench/experiments/nf4_bulk.py      # on an sm90 GPU; checks, then times; writes $OUT/nf4_bulk.json

Nsight Compute's source view of the package's kernel (`mistral_t4.kernels.nf4_cuda`, batch 1)
puts half of its stall samples on the first byte permute of each block: the warp waits for
its weight words, loaded by `ld.global` into a 4-block register ring (64 KB in flight per SM
at 1.9 TB/s: ~4.4 us per load); prefetching into L2 and every cache policy changed nothing.
Here each warp's lane 0 asks the TMA engine (`cp.async.bulk`, sm90) for the next chunks of C
blocks of its NG row groups (weights and scales: contiguous in the fragment layout) into a
ring of S slots in shared memory, completed on one mbarrier per slot; the lanes read their
16 bytes back (`ld.shared`) instead of holding them in registers. The ring lives in the 63 KB
of the window below the 64 KB-aligned table and above it (up to the 227 KB a block may have).
Everything else is the package's kernel (table, prmt addresses, MMAs, per-block scaling,
row groups per CTA; its stores and split-K sums are the package's `nf4_matmul_store`).

Result (H200, nf4_bulk_h200_2026-11-26.json; CUDA-graph replay, L2 flushed; 80-112 KB in
flight per SM against the package's 64 KB, 56-79 registers against 126): slower everywhere.
Per layer at 1 row 72.8 us (best variant and split per shape) vs the package's 65.9, at 8 rows
99.3 vs 87.2; the closest is gate_up at 1 row, 30.7 vs 29.4. So more bytes in flight, from the
TMA engine rather than the lanes, do not shorten the wait: with the L2-prefetch and
cache-policy results (nf4_wide.py), the weight stream seems limited elsewhere than in the
number of requests an SM has outstanding. (Its first run also reported "WRONG" for tiles of
17 groups with one group per warp: a harness error, 16 warps x 1 group cannot cover 17; the
harness now only asks tiles its warps can hold.)
"""
import dataclasses
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

BULK = r"""
__device__ __forceinline__ uint4 lds128(u32 a) {
    uint4 r; asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a)); return r; }
__device__ __forceinline__ uint2 lds64(u32 a) {
    uint2 r; asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "r"(a)); return r; }
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory"); }
__device__ __forceinline__ void expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory"); }
__device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred p;\nLAB_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra LAB_WAIT;\n}\n"
                 :: "r"(bar), "r"(parity) : "memory"); }

// per warp: S slots of NG groups x C blocks (512 bytes of weights + 64 of scales each)
template <int NG, int S, int C, int WARPS>
__device__ __forceinline__ void nf4_bulk_body(
        const u16* __restrict__ x, const uint4* __restrict__ wq, const uint2* __restrict__ scales,
        const u16* __restrict__ code, u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ counters,
        int M, int N, int K, int stride_xm, int stride_om, int split_k, int tile_groups) {
    extern __shared__ __align__(16) unsigned char window[];
    constexpr u32 SLOT = NG * C * 576, RING = S * SLOT;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 base = (u32)__cvta_generic_to_shared(window);
    const u32 table = (base + 0xFFFFu) & ~0xFFFFu;
    const u32 below = (table - base) / RING;  // rings that fit under the table
    const u32 ring = warp < below ? base + warp * RING : table + 65536 + (warp - below) * RING;
    {
        u32 size;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
        if (table + 65536u > base + size || ring + RING > base + size) __trap();
    }
    for (int i = tid; i < 2048; i += WARPS * 32) {
        const int b = i >> 3;
        const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);
        asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};" :: "r"(table + b * 256 + (i & 7) * 16), "r"(v));
    }
    const u32 flag = table + 128;
    const u32 bars = table + 256 * (1 + warp) + 128;  // this warp's S mbarriers, in row 1 + warp's unused half
    if (lane == 0) {
        #pragma unroll
        for (int s = 0; s < S; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bars + 8 * s) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const u32 lane_base = table | (lane << 2);
    const Nf4Tile tile = nf4_tile<NG>(N, K, split_k, tile_groups, warp);
    const int first = tile.first, end = tile.end, G0 = tile.G0, nb = tile.nb, kb0 = tile.kb0, kb1 = tile.kb1;
    const int g = lane >> 2, c = lane & 3;
    float acc[NG][1][4];
    #pragma unroll
    for (int q = 0; q < NG; q++) acc[q][0][0] = acc[q][0][1] = acc[q][0][2] = acc[q][0][3] = 0.f;
    if (G0 < end && kb0 < kb1) {
        const char* wsrc[NG];
        const char* ssrc[NG];
        #pragma unroll
        for (int q = 0; q < NG; q++) {
            const int G = min(G0 + q, end - 1);
            wsrc[q] = (const char*)(wq + (size_t)G * nb * 32);
            ssrc[q] = (const char*)(scales + (size_t)G * nb * 8);
        }
        const uint4* xp = x_lane(x, min(g, M - 1), stride_xm, c);
        const int chunks = (kb1 - kb0 + C - 1) / C;
        auto issue = [&](int j) {  // lane 0: chunk j into slot j % S
            const int b = kb0 + j * C, blocks = min(C, kb1 - b);
            const u32 slot = ring + (j % S) * SLOT, bar = bars + 8 * (j % S);
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the lanes' reads of the slot come first
            expect_tx(bar, NG * blocks * 576);
            #pragma unroll
            for (int q = 0; q < NG; q++) {
                bulk_copy(slot + q * C * 512, wsrc[q] + (size_t)b * 512, blocks * 512, bar);
                bulk_copy(slot + NG * C * 512 + q * C * 64, ssrc[q] + (size_t)b * 64, blocks * 64, bar);
            }
        };
        if (lane == 0)
            for (int j = 0; j < S - 1 && j < chunks; j++) issue(j);
        for (int i = 0; i < chunks; i++) {
            if (i + S - 1 < chunks) {
                __syncwarp();  // every lane is done with slot (i - 1) % S
                if (lane == 0) issue(i + S - 1);
            }
            bar_wait(bars + 8 * (i % S), (i / S) & 1);
            const u32 slot = ring + (i % S) * SLOT;
            #pragma unroll
            for (int cc = 0; cc < C; cc++) {
                const int b = kb0 + i * C + cc;
                if (b < kb1) {
                    uint4 x0, x1;
                    ld_x_block(xp, b, x0, x1);
                    #pragma unroll
                    for (int q = 0; q < NG; q++) {
                        const uint4 wv = lds128(slot + (q * C + cc) * 512 + lane * 16);
                        const uint2 sv = lds64(slot + NG * C * 512 + (q * C + cc) * 64 + g * 8);
                        float block[4];
                        #pragma unroll
                        for (int t = 0; t < 4; t++) {
                            const u32 w = word(wv, t);
                            const u32 a0 = lds(prmt(w, lane_base, 0x7604));
                            const u32 a1 = lds(prmt(w, lane_base, 0x7614));
                            const u32 a2 = lds(prmt(w, lane_base, 0x7624));
                            const u32 a3 = lds(prmt(w, lane_base, 0x7634));
                            const uint4 xw = t < 2 ? x0 : x1;
                            if (t == 0) mma0(block, a0, a1, a2, a3, word(xw, 0), word(xw, 1));
                            else mma(block, a0, a1, a2, a3, word(xw, (2 * t) & 3), word(xw, (2 * t + 1) & 3));
                        }
                        acc[q][0][0] = fmaf(__uint_as_float(sv.x), block[0], acc[q][0][0]);
                        acc[q][0][1] = fmaf(__uint_as_float(sv.x), block[1], acc[q][0][1]);
                        acc[q][0][2] = fmaf(__uint_as_float(sv.y), block[2], acc[q][0][2]);
                        acc[q][0][3] = fmaf(__uint_as_float(sv.y), block[3], acc[q][0][3]);
                    }
                }
            }
        }
    }
    nf4_matmul_store<1, NG, WARPS, false>(acc, out, partial, counters, M, N, stride_om, split_k, first, end, G0, flag);
}

#define NF4_BULK(NAME, NG, S, C, WARPS) \
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) NAME(const u16* x, const uint4* wq, const uint2* scales, \
        const u16* code, u16* out, float* partial, int* counters, int M, int N, int K, int stride_xm, int stride_om, \
        int split_k, int tile_groups) { \
    nf4_bulk_body<NG, S, C, WARPS>(x, wq, scales, code, out, partial, counters, M, N, K, stride_xm, stride_om, split_k, \
                                   tile_groups); }
"""

# (NG, S, C, WARPS)
VARIANTS = [(2, 4, 2, 16), (2, 6, 1, 16), (1, 8, 2, 16), (1, 6, 2, 16), (2, 8, 2, 8)]


def name(v):
    return "nf4_bulk_" + "_".join(map(str, v))


def source(variants=VARIANTS):
    from mistral_t4.kernels import nf4_cuda

    return nf4_cuda.SOURCE + BULK + "".join(f"NF4_BULK({name(v)}, {', '.join(map(str, v))})\n" for v in variants)


def shared_bytes(v, window_start):
    """Dynamic shared memory for variant v: the table on its 64 KB boundary, rings below and above it."""
    ng, s, c, warps = v
    ring = s * ng * c * 576
    table = (window_start + 0xFFFF) & ~0xFFFF
    below = (table - window_start) // ring
    return table + 65536 + max(0, warps - below) * ring - window_start


class Bulk:
    def __init__(self, variants=VARIANTS):
        from mistral_t4.kernels import nf4_cuda

        self.mod = nf4_cuda._Module(torch.device("cuda"), source(variants), "sm_90a")
        base = torch.zeros(1, dtype=torch.int32, device="cuda")
        self.mod.launch("smem_base", (1, 1), 32, [base], shared=16)
        self.window_start = int(base.item())

    def matmul(self, x, w, v, split_k, tile_groups, out=None):
        m, k = x.shape
        n = w.packed.shape[0]
        assert m <= 8
        if out is None:
            out = torch.empty((m, n), dtype=torch.float16, device=x.device)
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
        self.mod.launch(name(v), (-(-(n // 16) // tile_groups), split_k), v[3] * 32,
                        [x, w.packed, w.absmax, w.code_fp16, out, partial, w.tile_counters, m, n, k, x.stride(0),
                         out.stride(0), split_k, tile_groups], shared=shared_bytes(v, self.window_start))
        return out


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, check_matmul, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda

    dev = torch.device("cuda")
    start = time.time()
    bulk = Bulk()
    print(f"compiled in {time.time() - start:.1f} s; shared memory per variant:",
          [(v, shared_bytes(v, bulk.window_start)) for v in VARIANTS], flush=True)
    time_ms = timer(dev)
    failures = 0
    for n, k in [(96, 320), (48, 192), (1008, 4096), (4096, 14336)]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        w32 = dataclasses.replace(w, absmax=w.absmax.float())  # this kernel reads fp32 pairs (the package's before s15)
        ref_w = w.dequantize(torch.float32)
        for m in (1, 3, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ ref_w.T
            for split_k in (1, 3, 8):
                for v in VARIANTS:
                    for tile in (v[0] * v[3], 17) if v[0] * v[3] >= 17 else (v[0] * v[3], 15):
                        out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                        bulk.matmul(x, w32, v, split_k, tile, out=out)
                        failures += check_matmul(out, ref, w.tile_counters, f"n={n} k={k} m={m} split={split_k} {v} x{tile}")
        print(f"checked N={n} K={k}", flush=True)
    sms = multiprocessor_count(dev)
    results, per_layer = [], {}
    for shape, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        w32 = dataclasses.replace(w, absmax=w.absmax.float())  # this kernel reads fp32 pairs (the package's before s15)
        tile, split, _ = nf4_cuda.matmul_geometry(n, k, sms, ranges=False)  # its kernels: one K range per CTA
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = dict(shape=shape, m=m, package_ms=time_ms(lambda: nf4_cuda.nf4_matmul(
                x, w.packed, w.absmax, w.code_fp16, w.tile_counters)), tile_groups=tile, split_k=split)
            rows = []
            for v in VARIANTS:
                for sk in sorted({max(1, split // 2), split, min(16, split * 2)}):
                    t = min(tile, v[0] * v[3])
                    rows.append(dict(variant=v, split_k=sk, tile_groups=t,
                                     ms=time_ms(lambda: bulk.matmul(x, w32, v, sk, t))))
            rows.sort(key=lambda r: r["ms"])
            row["bulk"] = rows
            results.append(row)
            totals = per_layer.setdefault(m, dict(package=0.0, bulk=0.0))
            totals["package"] += row["package_ms"]
            totals["bulk"] += rows[0]["ms"]
            print(f"{shape} M={m}: package {row['package_ms'] * 1e3:.1f} us; bulk "
                  + ", ".join(f"{r['ms'] * 1e3:.1f} {r['variant']} s{r['split_k']}" for r in rows[:4]), flush=True)
    for m, t in per_layer.items():
        print(f"per layer M={m}: package {t['package'] * 1e3:.1f} us, bulk (best per shape) {t['bulk'] * 1e3:.1f}",
              flush=True)
    write_record("nf4_bulk", failures=failures, results=results, per_layer=per_layer)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
