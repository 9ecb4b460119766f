"""Experiment (not used by the package): an NF4 matmul on Hopper's wgmma for 9-64 rows, with a cp.async pipeline.

    python bench/experiments/nf4_wgmma.py        # on an sm90 GPU; checks, then times; writes $OUT/nf4_wgmma.json
    python bench/experiments/nf4_wgmma.py src    # print the CUDA source

Why: the package's CUDA kernel (`mistral_t4.kernels.nf4_cuda`, mma.sync) beats the Triton
kernel up to 8 rows but loses from 16, where each warp reloads x for every 16 weight rows.
Here the 4 warps of a warpgroup issue `wgmma.mma_async m64nNk16` together: operand A is the
looked-up weights straight from registers (a byte -> fp16-pair table in shared memory, as
in the package kernel), operand B is x from shared memory (K-major, no swizzle, 8x8 core
matrices, LBO 128 along K, SBO 256 along N).
  * A ring of S stages in dynamic shared memory, CB blocks of 64 K each, filled PF = S - 2
    stages ahead by cp.async: weights (each lane copies and reads back its own 16 bytes),
    scales, and x in 16-byte pieces; one barrier per stage.
  * Two sets of A registers: block b + 1's lookups run while block b's wgmma runs
    (`wgmma.wait_group 1`); AC = 2 gives alternate blocks their own accumulators.
  * WG warpgroups per CTA share the table and the staged x.
  * Weights in `natural_fragments` order: the package's fragment layout with each MMA's 16 K
    slots in natural order, so that x needs no reordering on its way to shared memory.

Results (H200, torch 2.11 + CUDA 13 NVRTC; decode shapes, CUDA-graph replay, L2 flushed,
best split/stages/warpgroups per shape; correct at 9-64 rows, odd shapes, split-K: relative
error 3.8e-4 against dequantize + fp32 matmul, as the Triton kernel):
  * this version (nf4_wgmma_pipelined_h200_2026-11-26.json; `ac` 1-2 in the kernel names),
    per layer against the Triton kernel: 16 rows 107 vs 116 us (1.08x; gate_up 1.44 TB/s of
    NF4), 32 rows 156 vs 135 (0.87x), 64 rows 245 vs 170 (0.69x). Two accumulator sets: no gain.
  * the lean kernel (`LEAN`, ac 0: per-thread base addresses plus immediates, running source
    pointers, fixed x pieces per thread; ~160 instead of ~190 instructions per warp and block,
    of which 64 are the lookups): 1.12x / 0.88x / 0.72x at 16 / 32 / 64 rows.
  * the same kernel with x copied in 4-byte pieces into the package's own K order (no second
    layout): 1.11x / 0.92x / 0.68x at 16 / 32 / 64 rows; with x staged through registers
    instead of cp.async: 0.96x / 0.86x / 0.59x.
  * the first version (commit 0c2e434, nf4_wgmma_h200_2026-11-26.json): x staged one block per
    barrier, wgmma waited for at once, weights in a 2-8 deep register ring: 0.95x / 0.88x at
    16 / 32 rows.
  * the natural K order in the package's mma.sync kernel (x then read as eight 4-byte pairs
    per lane and block instead of two 16-byte loads): per layer 89 vs 88 us at 1 row, 118 vs
    94 us at 8 (H200, two runs), so the package keeps its order. (The same runs show the
    experiment's mma.sync kernel, bench/experiments/nf4_cuda.py with fp16 scale pairs, 8% / 5%
    faster than the package's at 1 / 8 rows with the same split.)
What limits it (Nsight Compute, gate_up 4096 -> 28672, H200): occupancy. The table (32 KB)
plus 4 stages of x and weights leave room for one or two CTAs of 8 warps per SM (12-25%
occupancy); the warps stall on the pipeline's waits and the table loads, DRAM runs at 12-20%
of its peak and more rows of x only add shared memory. Next: a 16-copy table or the table in
registers (prmt, as the Triton kernel) to free shared memory, warp specialisation (a producer
warp with TMA bulk copies, consumers doing lookups and wgmma), and one CTA per SM looping over
tiles so the table is built once.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import torch  # noqa: E402



HEAD = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r; asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p)); return r; }
__device__ __forceinline__ u32 ld_u32(const u32* p) { u32 r; asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p)); return r; }
__device__ __forceinline__ uint4 ld_x(const uint4* p) {
    uint4 r; asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p)); return r; }
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) { u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r; }
__device__ __forceinline__ u32 word(uint4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ u16 to_half(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p)); return a; }
__device__ __forceinline__ void sts32(u32 addr, u32 v) { asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(v)); }
__device__ __forceinline__ u64 desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32); }
"""


def wgmma_fns(mt):
    """wg_issue_MT: fence + 4 wgmma m64n(8MT)k16 (A from registers, B by descriptor) + commit; wg_wait_MT<N>."""
    n = 8 * mt
    nacc = 4 * mt
    d = ",".join(f"%{i}" for i in range(nacc))
    lines = ["wgmma.fence.sync.aligned;"]
    for t in range(4):
        a = ",".join(f"%{nacc + 4 * t + i}" for i in range(4))
        lines.append(f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{d}}}, {{{a}}}, %{nacc + 16 + t}, p, 1, 1, 0;")
    lines += ["wgmma.commit_group.sync.aligned;"]
    body = "\\n".join(lines)
    outs = ", ".join(f'"+f"(acc[{i}])' for i in range(nacc))
    ins = ", ".join([f'"r"(a[{i}])' for i in range(16)] + [f'"l"(ds[{t}])' for t in range(4)] + ['"r"(one)'])
    return f"""
__device__ __forceinline__ void wg_issue_{mt}(float* acc, const u32* a, const u64* ds) {{
    const u32 one = 1;
    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nacc + 20}, 0;\\n{body}\\n}}\\n" : {outs} : {ins} : "memory");
}}
template <int N> __device__ __forceinline__ void wg_wait_{mt}(float* acc) {{
    asm volatile("wgmma.wait_group.sync.aligned %{nacc};" : {outs} : "n"(N) : "memory");
}}
"""


HELPERS = r"""
__device__ __forceinline__ void cp16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory"); }
__device__ __forceinline__ void cp16z(u32 dst, const void* src, bool ok) {  // ok = false: writes zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory"); }
__device__ __forceinline__ uint4 lds128(u32 a) {
    uint4 r; asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a)); return r; }
__device__ __forceinline__ u32 lds32(u32 a) {
    u32 r; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(a)); return r; }
__device__ __forceinline__ uint2 lds64(u32 a) {
    uint2 r; asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "r"(a)); return r; }

"""

# the signature and shared memory of both kernels (KNAME, WG substituted per variant)
KERNEL_HEAD = r"""
extern "C" __global__ void __launch_bounds__(128 * WG) KNAME(
        const u16* __restrict__ x, const uint4* __restrict__ wq, const uint2* __restrict__ scales,
        const u16* __restrict__ code, u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ counters,
        int M, int N, int K, int stride_xm, int stride_om, int split_k) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ int is_last;
"""

# this warp's row group G (Gc: clamped) and this CTA's K blocks kb0 .. kb1 (split-K), in stages of CB blocks
TILE_RANGE = r"""
    const int n_groups = N >> 4;
    const int G = blockIdx.x * WARPS + warp;
    const int Gc = min(G, n_groups - 1);  // past the end: recompute the last group, never stored
    const int nb = K >> 6;
    const int per = (nb + split_k - 1) / split_k;
    const int kb0 = blockIdx.y * per;
    const int kb1 = min(kb0 + per, nb);
    const int stages = (kb1 - kb0 + CB - 1) / CB;
    const int g = lane >> 2, c = lane & 3;
"""

BODY = r"""
// out (M, N) = x (M <= 8 MT, K) @ W.T, W in the fragment layout. Grid (cdiv(N, 64 WG), split_k), 128 WG threads:
// warpgroup wg of block x owns rows 64 (WG x + wg) .. + 63, warp w the 16-row group 4 (WG x + wg) + w.
// A ring of S stages in shared memory, CB blocks of 64 K each, filled by cp.async PF = S - 2 stages ahead:
// weights (each lane copies and reads back its own 16 bytes), scales (64 bytes per warp and block), and
// x (4-byte copies that put it in wgmma's K-major core-matrix layout, in the fragment layout's K order).
KERNEL_HEAD
    u32* lut = (u32*)smem;  // 32 KB: 256 entries x 32 copies
    constexpr int THREADS = 128 * WG, WARPS = 4 * WG, PF = S - 2;
    constexpr int SLICE = MT * 256;  // x for one k16 step: MT core matrices along N x 2 along K, 128 B each
    constexpr int BLOCK_X = 4 * SLICE;  // x for one 64-wide K block
    constexpr int STAGE_X = CB * BLOCK_X, STAGE_W = CB * WARPS * 512, STAGE_S = CB * WARPS * 64;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int b = tid >> 3; b < 256; b += THREADS / 8) {
        const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);
        *(uint4*)(lut + b * 32 + (tid & 7) * 4) = make_uint4(v, v, v, v);
    }
    const u32 xs0 = smem_addr(smem + 32768), ws0 = xs0 + S * STAGE_X, ss0 = ws0 + S * STAGE_W;
TILE_RANGE
    const char* lut_lane = (const char*)lut + (lane << 2);
    const uint4* wp = wq + (size_t)Gc * nb * 32 + lane;
    const uint4* sp = (const uint4*)(scales + (size_t)Gc * nb * 8) + lane;  // lanes 0-3: 16 bytes of a block's 64
    // x: per stage CB blocks x 8 MT rows x 8 pieces of 16 bytes (k 8p .. 8p + 7 of a block = MMA t = p / 2, K
    // slots 8h .. 8h + 7 with h = p % 2): piece i = tid + THREADS j: p = i % 8, row n = (i / 8) % (8 MT), block i / (64 MT)
    constexpr int XPIECES = CB * MT * 64 / THREADS;
    static_assert(XPIECES * THREADS == CB * MT * 64, "x pieces do not split evenly");
    auto issue = [&](int st) {
        const int cb = kb0 + st * CB;
        const int buf = st % S;
        #pragma unroll
        for (int d = 0; d < CB; d++) {
            const int b = cb + d;
            if (b < kb1) {
                cp16(ws0 + buf * STAGE_W + (d * WARPS + warp) * 512 + lane * 16, wp + (size_t)b * 32);
                if (lane < 4) cp16(ss0 + buf * STAGE_S + (d * WARPS + warp) * 64 + lane * 16, sp + (size_t)b * 4);
            }
        }
        #pragma unroll
        for (int j = 0; j < XPIECES; j++) {
            const int i = tid + THREADS * j, p = i & 7, n = (i >> 3) % (8 * MT), bb = (i >> 3) / (8 * MT);
            const bool ok = n < M && cb + bb < kb1;
            cp16z(xs0 + buf * STAGE_X + bb * BLOCK_X + (p >> 1) * SLICE + (p & 1) * 128 + (n >> 3) * 256 + (n & 7) * 16,
                  ok ? x + (size_t)n * stride_xm + (cb + bb) * 64 + 8 * p : x, ok);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    float accs[AC][4 * MT];  // AC accumulator sets, block d takes set d % AC: AC independent wgmma chains
    #pragma unroll
    for (int u = 0; u < AC; u++)
        #pragma unroll
        for (int i = 0; i < 4 * MT; i++) accs[u][i] = 0.f;
    float* acc = accs[0];
    #pragma unroll
    for (int st = 0; st < PF; st++) issue(st);
    u32 a[2][16];
    for (int st = 0; st < stages; st++) {
        asm volatile("cp.async.wait_group %0;" :: "n"(PF - 1) : "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // stage st is in; every thread is done with stage st - 2's buffer (MMAs included)
        issue(st + PF);
        const int buf = st % S;
        #pragma unroll
        for (int d = 0; d < CB; d++) {
            const int b = kb0 + st * CB + d;
            if (b < kb1) {
                const uint4 w = lds128(ws0 + buf * STAGE_W + (d * WARPS + warp) * 512 + lane * 16);
                const uint2 s = lds64(ss0 + buf * STAGE_S + (d * WARPS + warp) * 64 + g * 8);
                u32 s2; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(s2) : "f"(__uint_as_float(s.y)), "f"(__uint_as_float(s.x)));
                const u32 s_g = prmt(s2, s2, 0x1010), s_g8 = prmt(s2, s2, 0x3232);
                u32* ar = a[d & 1];
                #pragma unroll
                for (int t = 0; t < 4; t++) {
                    const u32 q = word(w, t);
                    ar[4 * t + 0] = hmul2(*(const u32*)(lut_lane + ((q << 7) & 0x7F80)), s_g);
                    ar[4 * t + 1] = hmul2(*(const u32*)(lut_lane + ((q >> 1) & 0x7F80)), s_g8);
                    ar[4 * t + 2] = hmul2(*(const u32*)(lut_lane + ((q >> 9) & 0x7F80)), s_g);
                    ar[4 * t + 3] = hmul2(*(const u32*)(lut_lane + ((q >> 17) & 0x7F80)), s_g8);
                }
                const u32 xb = xs0 + buf * STAGE_X + d * BLOCK_X;
                u64 ds[4];
                #pragma unroll
                for (int t = 0; t < 4; t++) ds[t] = desc(xb + t * SLICE, 128, 256);
                WG_ISSUE(accs[d % AC], ar, ds);
                #pragma unroll
                for (int u = 0; u < AC; u++) WG_WAIT<1>(accs[u]);
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < AC; u++) WG_WAIT<0>(accs[u]);
    #pragma unroll
    for (int u = 1; u < AC; u++)
        #pragma unroll
        for (int i = 0; i < 4 * MT; i++) acc[i] += accs[u][i];
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    EPILOGUE
}
"""

def shared_bytes(mt, cb, st, wg):
    return 32768 + st * cb * (mt * 1024 + 4 * wg * (512 + 64))


EPILOGUE = r"""
    // acc[4j + 2h + e] = out[m = 8j + 2c + e, n = 16G + g + 8h]
    if (split_k == 1) {
        if (G < n_groups) {
            #pragma unroll
            for (int i = 0; i < 4 * MT; i++) {
                const int m = 8 * (i >> 2) + 2 * c + (i & 1), n = G * 16 + g + 8 * ((i >> 1) & 1);
                if (m < M) out[(size_t)m * stride_om + n] = to_half(acc[i]);
            }
        }
        return;
    }
    if (G < n_groups) {
        #pragma unroll
        for (int i = 0; i < 4 * MT; i++) {
            const int m = 8 * (i >> 2) + 2 * c + (i & 1), n = G * 16 + g + 8 * ((i >> 1) & 1);
            if (m < M) partial[((size_t)blockIdx.y * M + m) * N + n] = acc[i];
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(counters + blockIdx.x, 1) == split_k - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (G < n_groups) {
        for (int i = 0; i < 4 * MT; i++) {
            const int m = 8 * (i >> 2) + 2 * c + (i & 1), n = G * 16 + g + 8 * ((i >> 1) & 1);
            if (m < M) {
                float total = 0.f;
                for (int k = 0; k < split_k; k++) {
                    const float* p = partial + ((size_t)k * M + m) * N + n;
                    float v; asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
                    total += v;
                }
                out[(size_t)m * stride_om + n] = to_half(total);
            }
        }
    }
    if (tid == 0) counters[blockIdx.x] = 0;
"""

LEAN = r"""
// The same pipeline, lean: every shared-memory address a per-thread base (+ the stage's offset) plus an
// immediate, descriptors likewise, running source pointers, x copied by each thread at a fixed row and piece.
KERNEL_HEAD
    constexpr int S = SVAL, THREADS = 128 * WG, WARPS = 4 * WG, PF = S - 2;
    constexpr int SLICE = MT * 256, BLOCK_X = 4 * SLICE;
    constexpr int STAGE_X = CB * BLOCK_X, STAGE_W = CB * WARPS * 512, STAGE_S = CB * WARPS * 64;
    constexpr int RP = THREADS / 8, ROWS = 8 * MT;  // x: slots (block, row) per pass of the threads; rows staged
    constexpr int XP = CB * ROWS / RP;  // passes per stage
    static_assert(XP >= 1 && XP * RP == CB * ROWS, "x slots do not split evenly");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    u32* lut = (u32*)smem;
    for (int b = tid >> 3; b < 256; b += THREADS / 8) {
        const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);
        *(uint4*)(lut + b * 32 + (tid & 7) * 4) = make_uint4(v, v, v, v);
    }
    const u32 lut0 = smem_addr(smem), xs0 = lut0 + 32768, ws0 = xs0 + S * STAGE_X, ss0 = ws0 + S * STAGE_W;
TILE_RANGE
    const u32 lane4 = lane << 2;
    const uint4* wsrc = wq + ((size_t)Gc * nb + kb0) * 32 + lane;
    const uint4* ssrc = (const uint4*)(scales + ((size_t)Gc * nb + kb0) * 8) + (lane & 3);
    const u32 wlane = ws0 + warp * 512 + lane * 16, sdst = ss0 + warp * 64 + (lane & 3) * 16, slane = ss0 + warp * 64 + g * 8;
    // x: this thread copies piece p = tid % 8 (k 8p .. 8p + 7 of a block: MMA p / 2, K slots 8 (p % 2) ..) of
    // slot tid / 8 + RP j of each stage: slot = block * ROWS + row
    const int p = tid & 7, row0 = (tid >> 3) % ROWS, bb0 = (tid >> 3) / ROWS;
    const u32 xdst = xs0 + bb0 * BLOCK_X + (p >> 1) * SLICE + (p & 1) * 128 + (row0 >> 3) * 256 + (row0 & 7) * 16;
    const u16* xsrc = x + (size_t)row0 * stride_xm + (kb0 + bb0) * 64 + 8 * p;
    const u32 dlo = ((xs0 & 0x3FFFF) >> 4) | ((128 >> 4) << 16);  // descriptor: address, LBO 128; SBO 256 high
    float acc[4 * MT];
    #pragma unroll
    for (int i = 0; i < 4 * MT; i++) acc[i] = 0.f;
    const int nblk = kb1 - kb0;
    int next = 0;  // the next block to copy, relative to kb0; the pointers below point at it
    const uint4* wnext = wsrc;
    const uint4* snext = ssrc;
    const u16* xnext = xsrc;
    auto issue = [&](const int buf) {
        #pragma unroll
        for (int d = 0; d < CB; d++) {
            if (next + d < nblk) {
                cp16(wlane + buf * STAGE_W + d * WARPS * 512, wnext + d * 32);
                if (lane < 4) cp16(sdst + buf * STAGE_S + d * WARPS * 64, snext + d * 4);
            }
        }
        #pragma unroll
        for (int j = 0; j < XP; j++) {
            const int drow = RP < ROWS ? RP * (j % (ROWS / RP)) : 0;  // multiples of 8
            const int dbb = RP < ROWS ? j / (ROWS / RP) : (RP / ROWS) * j;
            const bool ok = row0 + drow < M && next + bb0 + dbb < nblk;
            cp16z(xdst + buf * STAGE_X + dbb * BLOCK_X + (drow >> 3) * 256, ok ? xnext + drow * stride_xm + dbb * 64 : x, ok);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        next += CB; wnext += CB * 32; snext += CB * 4; xnext += CB * 64;
    };
    #pragma unroll
    for (int st = 0; st < PF; st++) issue(st);
    u32 a[2][16];
    int rbuf = 0, wbuf = PF;  // the stage buffers read and written next
    for (int st = 0; st < stages; st++) {
        asm volatile("cp.async.wait_group %0;" :: "n"(PF - 1) : "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // stage st is in; every thread is done with stage st - 2's buffer (MMAs included)
        issue(wbuf);
        wbuf = wbuf + 1 == S ? 0 : wbuf + 1;
        const u32 wb = wlane + rbuf * STAGE_W, sb = slane + rbuf * STAGE_S, db = dlo + rbuf * (STAGE_X >> 4);
        rbuf = rbuf + 1 == S ? 0 : rbuf + 1;
        #pragma unroll
        for (int d = 0; d < CB; d++) {
            if (st * CB + d < nblk) {
                const uint4 w = lds128(wb + d * WARPS * 512);
                const uint2 sc = lds64(sb + d * WARPS * 64);
                u32 s2; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(s2) : "f"(__uint_as_float(sc.y)), "f"(__uint_as_float(sc.x)));
                const u32 s_g = prmt(s2, s2, 0x1010), s_g8 = prmt(s2, s2, 0x3232);
                u32* ar = a[d & 1];
                #pragma unroll
                for (int t = 0; t < 4; t++) {
                    const u32 q = word(w, t);
                    ar[4 * t + 0] = hmul2(lds32(lut0 + (((q << 7) & 0x7F80) | lane4)), s_g);
                    ar[4 * t + 1] = hmul2(lds32(lut0 + (((q >> 1) & 0x7F80) | lane4)), s_g8);
                    ar[4 * t + 2] = hmul2(lds32(lut0 + (((q >> 9) & 0x7F80) | lane4)), s_g);
                    ar[4 * t + 3] = hmul2(lds32(lut0 + (((q >> 17) & 0x7F80) | lane4)), s_g8);
                }
                u64 ds[4];
                #pragma unroll
                for (int t = 0; t < 4; t++) ds[t] = ((u64)(256 >> 4) << 32) | (db + ((d * BLOCK_X + t * SLICE) >> 4));
                WG_ISSUE(acc, ar, ds);
                WG_WAIT<1>(acc);
            }
        }
    }
    WG_WAIT<0>(acc);
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    EPILOGUE
}
"""


# (MT, CB, S, WG) compiled; MT = column tiles of 8 rows (rows <= 8 MT)
VARIANTS = [(mt, cb, st, wg, ac) for mt in (2, 4, 8) for cb, st in ((2, 4), (4, 4)) for wg in (1, 2) for ac in (1, 2)
            if shared_bytes(mt, cb, st, wg) <= 227 * 1024 and cb * mt * 64 % (128 * wg) == 0]
VARIANTS += [(mt, cb, st, 2, 0) for mt in (2, 4, 8) for cb, st in ((2, 4), (2, 5), (2, 6))
             if shared_bytes(mt, cb, st, 2) <= 227 * 1024 and cb * mt * 8 >= 32]


def name(mt, cb, st, wg, ac):
    """ac: accumulator sets of the first kernel; 0 = the lean kernel."""
    return f"wg_{mt}_{cb}_{st}_{wg}_{ac}"


def source(variants=VARIANTS):
    s = HEAD + HELPERS
    for mt in sorted({v[0] for v in variants}):
        s += wgmma_fns(mt)
    for mt, cb, st, wg, ac in variants:
        body = ((BODY if ac else LEAN).replace("KERNEL_HEAD\n", KERNEL_HEAD).replace("TILE_RANGE\n", TILE_RANGE)
                .replace("EPILOGUE", EPILOGUE))
        for key, value in (("KNAME", name(mt, cb, st, wg, ac)), ("AC", str(ac)), ("WG_ISSUE", f"wg_issue_{mt}"), ("WG_WAIT", f"wg_wait_{mt}"),
                           ("MT", str(mt)), ("CB", str(cb)), ("WG", str(wg))):
            body = body.replace(key, value)
        s += (body.replace("PF = S - 2", f"PF = {st} - 2").replace("st % S", f"st % {st}").replace("S * STAGE", f"{st} * STAGE")
              .replace("SVAL", str(st)))
    return s


def column_tiles(m):
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def matmul(mod, x, frag, scales, code16, counters, n, split_k, cb=2, st=4, wg=2, ac=1, out=None):
    m, k = x.shape
    mt = column_tiles(m)
    if out is None:
        out = torch.empty((m, n), dtype=torch.float16, device=x.device)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (-(-n // (64 * wg)), split_k)
    mod.launch(name(mt, cb, st, wg, ac), grid, 128 * wg,
               [x, frag, scales, code16, out, partial, counters, m, n, k, x.stride(0), out.stride(0), split_k],
               shared=shared_bytes(mt, cb, st, wg))
    return out


def natural_fragments(w):
    """The package's "cuda" NF4Weight -> this kernel's bytes: the fragment layout with each MMA's 16 K slots in
    natural order (byte 2h + rh of word t, lane 4g + c: row g + 8rh, k = 64b + 16t + 8h + 2c), so that x goes to
    shared memory in 16-byte pieces; the package's order (k = 64b + 16c + 4t + 2h) suits its mma.sync kernel, whose
    lanes then read x in 16-byte pieces. Scales are the same in both."""
    packed = w.bnb_packed()
    n, k = packed.shape[0], packed.shape[1] * 2
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1)
    q = q.view(n // 16, 2, 8, k // 64, 4, 2, 4, 2).permute(0, 3, 2, 6, 4, 5, 1, 7)  # (G, b, g, c, t, h, rh, e)
    return (q[..., 0] | (q[..., 1] << 4)).contiguous().view(n, k // 2)


def main():
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, random_param, rel_error, timer

    from mistral_t4.kernels import NF4Weight, nf4_cuda, nf4_triton

    dev = torch.device("cuda")
    start = time.time()
    mod = nf4_cuda._Module(dev, source(), "sm_90a")
    print(f"compiled in {time.time() - start:.1f} s; log: {mod.log.strip()[:2000]}", flush=True)
    t = timer(dev)
    bad = 0
    for n, k in [(96, 320), (48, 192), (1024, 4096), (4096, 14336)]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        frag = natural_fragments(w)
        scales = w.absmax.float()  # this kernel reads fp32 pairs (the package's layout had them before s15)
        wf = w.dequantize(torch.float32)
        code16 = w.code_fp16.view(torch.int16)
        for m in (9, 16, 17, 32, 33, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ wf.T
            for mt, cb, st, wg, ac in VARIANTS:
                if mt != column_tiles(m):
                    continue
                for sk in (1, 3, 8):
                    out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                    matmul(mod, x, frag, scales, code16, w.tile_counters, n, sk, cb, st, wg, ac, out=out)
                    torch.cuda.synchronize()
                    e = rel_error(out, ref)
                    z = int(w.tile_counters.abs().sum())
                    if not (e < 2e-3 and z == 0):
                        bad += 1
                        print("BAD", n, k, m, (mt, cb, st, wg, ac), sk, e, z, flush=True)
        print("checked", n, k, flush=True)
    if bad:
        print(f"{bad} failures; not timing", flush=True)
    tot, results = {}, []
    for shape, k, n in ([] if bad else [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]):
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda")
        wt = NF4Weight.from_bnb(random_param(k, n, dev), backend="triton")
        frag = natural_fragments(w)
        scales = w.absmax.float()  # this kernel reads fp32 pairs (the package's layout had them before s15)
        code16 = w.code_fp16.view(torch.int16)
        wf = w.dequantize(torch.float32)
        for m in (16, 32, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ wf.T
            tri = t(lambda: nf4_triton.nf4_matmul(x, wt.packed, wt.absmax, wt.code_fp16, wt.tile_counters, 64))
            rows = []
            for mt, cb, st, wg, ac in VARIANTS:
                if mt != column_tiles(m):
                    continue
                for sk in (1, 2, 4, 8):
                    def fn():
                        return matmul(mod, x, frag, scales, code16, w.tile_counters, n, sk, cb, st, wg, ac)

                    e = rel_error(fn(), ref)
                    rows.append(dict(ms=t(fn), split_k=sk, cb=cb, st=st, wg=wg, ac=ac, err=e))
            rows.sort(key=lambda r: r["ms"])
            results.append(dict(shape=shape, m=m, triton_ms=tri, wgmma=rows))
            tt = tot.setdefault(m, [0.0, 0.0])
            tt[0] += tri
            tt[1] += rows[0]["ms"]
            b = rows[0]
            print(f"{shape} M={m}: triton {tri * 1e3:.1f} us, wgmma {b['ms'] * 1e3:.1f} us "
                  f"(split {b['split_k']} cb {b['cb']} st {b['st']} wg {b['wg']} ac {b['ac']}, err {b['err']:.1e}, "
                  f"{w.nbytes / b['ms'] / 1e6:.0f} GB/s); next " + ", ".join(
                      f"{r['ms'] * 1e3:.1f}({r['split_k']},{r['cb']},{r['st']},{r['wg']},{r['ac']})" for r in rows[1:4]), flush=True)
            for ac in (1, 2):
                best = min(r["ms"] for r in rows if r["ac"] == ac)
                tt = tot.setdefault(f"{m} ac{ac}", [0.0, 0.0])
                tt[0] += tri
                tt[1] += best
    for m, (a, b) in tot.items():
        print(f"per layer M={m} (acN: N accumulator sets; else the best): triton {a * 1e3:.1f} us, wgmma {b * 1e3:.1f} us, x{a / b:.2f}", flush=True)
    if os.environ.get("OUT"):
        system = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        with open(os.path.join(os.environ["OUT"], "nf4_wgmma.json"), "w") as f:
            json.dump(dict(system=system, failures=bad, results=results,
                           per_layer={str(m): dict(triton_ms=a, wgmma_ms=b) for m, (a, b) in tot.items()}), f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "src":
        print(source())
        sys.exit()
    main()
