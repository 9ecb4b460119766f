"""CUDA kernels for NF4 weights at a few rows (sm80+, and sm75): compiled at run time by NVRTC.

Reference: `nf4.py`. Used by the "cuda" backend, which `kernels.select_kernels` picks on
sm80+ when an engine decodes at most `kernels.cuda_rows()` rows per step (64 by default: the
chat, the interactive mode, the 32-request benchmark and the sweep up to 64; larger engines
keep the Triton kernel), and on sm75 (T4) where it beats bitsandbytes' there (`kernels.nf4_race`).
On sm75 (`__CUDA_ARCH__ < 800`) each m16n8k16 MMA is two m16n8k8 on the same registers, and the block
holds the 64 KB table alone (a T4 gives a block 64 KB; its shared window starts at 0), so each CTA
takes one K range (`_Module.ranges`, `launch_plan`); no programmatic dependent launch.
Kernels for 8, 16, 32 and 64 rows (`KERNELS`: 1, 2, 4, 8 column tiles of 8 rows, and a wide
32-row one for large N, `kernel_for`); with K ranges per CTA they beat the Triton kernel per
layer at every size up to 64 rows (at 64 by 7%: 156.9 vs 169.4 us; qkv alone is 3% slower,
25.2 vs 24.4).

Why not Triton here: Triton's lookup of the 16-entry table runs on the integer pipe (16
`prmt` + 6 logic ops per 8 weights; 64 integer ops per clock per SM on sm80/sm90, half the
fp32 rate), and the dequantized tile goes through shared memory to reach the tensor cores.
This kernel, per 2 weights: one byte permute (the address) and one shared-memory load, and
the result is already a tensor-core register:
  * a byte -> half2 table in shared memory: entry b = (code[b & 15], code[b >> 4]) in fp16,
    32 copies side by side so that lane l always reads bank l (no conflicts). Rows are 256
    bytes apart (the copies fill the first 128) and the table starts on a 64 KB boundary
    of the CTA's shared window, so table + 256 * byte_j + 4 * lane is one
    `prmt(word, table | 4 * lane, 0x76j4)`: bytes [4 lane, byte j, table >> 16, table >> 24].
    The window starts at 1 KB on sm90 (the driver's reserved part), so a CTA asks for
    127 KB (`table_shared_bytes`, probed at load) and an SM holds one: 16 warps share it;
    cards that give a block less (sm86/sm89: 99 KB) keep the Triton kernel (`available`);
  * `mma.sync.m16n8k16` with the table values as operand A straight from those registers, x
    as operand B (1, 2 or 4 column tiles of 8 rows); a 64-weight block shares one absmax per
    row, so each block's 4 MMAs sum into fresh fp32 registers that are then scaled into the
    accumulator (4 FMAs per lane and block instead of 16 fp16x2 multiplies of the weights). At
    32 rows (4 tiles) the 16 multiplies cost no more than the 16 FMAs, and the kernels take them
    (`Kernel.scale_a`): the pairs times their rows' absmax in fp16 (W in fp16 as the reference's
    dequantized W, its code and absmax rounded first: within an ulp or two), the MMAs straight into
    the accumulators, independent chains and 62 registers fewer; per
    layer 106.8 -> 101.7 us, W32 +1.7% (H200, bench/results/h200_2026-11-27_s10_scale_a/);
  * each warp owns 2 groups of 16 weight rows (4 in the wide 32-row kernel) that share x's
    fragments, with a ring of 4 blocks of 128-bit weight loads that skip L1 (2 in the wide
    kernel and at 64 rows, for registers), refilled as each block is used;
  * the ring's first loads go out before the table is built, so the table waits under them;
  * K cut into ranges among a CTA's warps (`slices`: a CTA of 2 row groups has 16 warps each
    on a 16th of K), their sums added in shared memory in range order; split-K across CTAs
    too where needed, with per-tile counters as the Triton kernel: the last CTA of a tile sums
    the partials in a fixed order and resets its counter (one launch, CUDA-graph safe);
  * one CTA per SM, so the grid is sized in waves: `matmul_geometry` picks the row groups per
    CTA (2-32, a runtime argument), the split and the ranges so that one wave fills the SMs
    (on 132 SMs: o and down 128 CTAs of 2 groups x 16 ranges, gate_up 128 of 14 x 2, qkv 96
    of 4 x 8) with no partial sums through global memory.
  * SwiGLU epilogue (`nf4_matmul(..., swiglu=True)`, the `_swiglu` instances of the kernels with
    an even number of groups per warp): for the fused gate/up weight each warp takes gate's groups
    and the up groups of the same outputs (N / 32 groups on), so one lane holds both sums of an
    output and stores SiLU(gate) * up, computed from the fp16-rounded sums as eager PyTorch does
    (the same bits as the matmul then `silu_mul`); the decode step loses an elementwise kernel and
    gate/up's output is half as large. Per call at 1 / 32 / 64 rows 30.0 / 50.1 / 77.0 us against
    32.2 / 56.0 / 85.7 for the two steps (H200, bench/results/h200_2026-11-27_s9_swiglu_early/).
  * Programmatic dependent launch (`early`, sm90): the kernel loads its first weights and builds
    its table before `griddepcontrol.wait`, and lets its dependents start after its main loop. The
    decode step launches every one of its CUDA NF4 matmuls early: qkv and gate/up after the add +
    RMSNorm kernel (`norm_triton.py`), o after the Triton attention kernels, down after gate/up's
    SwiGLU kernel, all of which take part in the chain (`model.FastMistral`, `kernels.early_launch`).
    With the epilogue: batch 1 2.52 -> 2.18 ms per token, W32 6,390 -> 6,720 output tok/s (H200,
    bench/results/h200_2026-11-27_s9_swiglu_early/ and h200_2026-11-27_s9_norm_chain/).
  * The decode step's RMSNorms in the epilogues (`nf4_matmul(..., residual=, norm_weight=)` / `(sq=, eps=)`,
    the `_residual` / `_scaled` instances of the 8- and 16-row kernels, `norm_kernels`): o and down store the
    residual sum, its product with the next norm's weight and its sums of squares per 16 columns; qkv and
    gate/up take that product as x and scale each row by 1 / sqrt(mean square + eps) before rounding. Two
    kernels fewer per layer: a 1-row step 2.108 -> 2.030 ms, 16 rows 2.605 -> 2.570 (H200,
    bench/results/h200_2026-11-27_s13_norms_in_matmuls/; at 32 rows it lost, `kernels.norms_in_matmuls`).
    The template's NORM makes them instances of their own: passed at run time, the unused norm code made the
    plain 32-row kernels 12.6% slower. The `_residual` kernels load the residual and the norm weight before they
    wait for the kernel before them (`residual_loads`: both are older than it), not in the epilogue: a 1-row step
    2.238 / 2.232 -> 2.214 / 2.214 ms (H100, bench/results/h100_2026-11-27_s14_attention_early_tile/residual_ahead/).
  * The weight, scale and x pointers run with the loads (`RUN`, all but the 64-row kernel): ptxas had been deriving
    every address again from the group and block in each iteration (it rematerialises them under register pressure),
    a quarter of the 32-row kernels' loop. Replayed decode step, same logits bit for bit: 32 rows 3.553 -> 3.455 ms,
    1 row 2.094 -> 2.037 (H100, bench/results/h100_2026-11-27_s16_running_pointers/).
`nf4_matmul_body` is a template (column tiles, groups per warp, ring depth, warps, SwiGLU, scale_a, NORM); the
package's instances are `KERNELS` (and `norm_kernels`); bench/experiments/nf4_wide*.py instantiate others.
Measured on an H200 (CUDA-graph replay, L2 flushed, bench/experiments/nf4_wide_*.json): per
layer at 1 row 67 us against 85 us for the previous version of this kernel (the shift-and-mask
address, a 32 KB table, 4 warps per CTA) and 109 us for the Triton kernel; at 8 rows 88-90 / 96
/ 114; at 16 / 32 rows the Triton kernel won then (each warp reloads x for every 16-32 weight
rows, and split-K partials grow with the rows).
8 layers of decode-step matmuls in one graph at 1 row: 0.52 ms, 1.88 TB/s of NF4 (Triton:
0.84 ms); batch-1 decode 3.30 -> 2.71 ms per token (bench/results/h200_2026-11-26_s5_prmt_table/).
K ranges per CTA instead of split-K across CTAs (bench/experiments/nf4_ranges.py): per layer at
8 rows 86.6 -> 68.7 us, at 1 row 65.7 -> 64.9; at 16 rows 76.5 us and at 32 rows 116.8 (1 group per
warp) against Triton's 116.1 / 136.0 (nf4_ranges.py). At 32 rows the narrow kernel is bound by L1
throughput (ncu: 84% L1, 19% DRAM; every warp loads x's 32 rows for its one group); the wide kernel
(8 warps of 4 groups) takes qkv and gate_up: per layer at 32 rows 118.6 -> 107.8 us against
Triton's 135.8 (nf4_ranges_wide32_h200_2026-11-26.json); the 32-request benchmark 4.49 -> 4.17 ms
per decode step (Triton: 4.98; bench/results/h200_2026-11-26_s7_rows32/).
Reading the next matmul's weights into L2 at the end of each matmul (`prefetch.global.L2`, so
that the DRAM fetches them during the norms, rotary and attention between the two) did not pay:
batch 1 2.61 -> 2.65 ms per token with 16 MB ahead, W32 within 1% (a CTA's prefetches delay
its exit; bench/experiments/nf4_prefetch_h200_2026-11-27.json, the trial at commit 1b55dd4).
Nor did each kernel asking the TMA engine to prefetch its own next K blocks into L2 before it waits
(`cp.async.bulk.prefetch.L2`): 1-row step 2.20 -> 2.32-2.40 ms (H100, bench/results/h100_2026-11-27_s15_l2_prefetch_trial/).
Running o, gate/up and down as phases of one persistent kernel (each CTA builds its table once and sends a phase's
first loads before a grid barrier) did not pay either: bit-exact, but a decode step at 1 row 2.033 -> 2.077 ms and at
16 rows 2.570 -> 2.722 (the barrier through L2 costs more than early launch's turnover; H200,
bench/results/h200_2026-11-27_s14_o_mlp_chain/). What is left at 1 row is mostly the stream itself:
the same loads with the arithmetic taken out run 48.5 us per layer (bench/experiments/nf4_stream.py).

Layout ("fragments", made once at load by `to_fragments`, undone by `from_fragments`):
rows in groups of 16 (G), K in blocks of 64 (b). Per (G, b) 512 bytes; lane l = 4g + c of a
warp owns bytes 16l .. 16l + 15: word t (0..3), byte j = 2h + rh holds the two weights of
row 16G + g + 8rh at k = 64b + 16c + 4t + 2h (low nibble) and k + 1 (high nibble). Those
are exactly the A registers of the t-th m16n8k16 MMA if the MMA's K slots are mapped to
physical k in the same order for x, which then reads its 16 values at 64b + 16c .. + 15,
contiguous (a dot product does not care about the order of its terms). (An order in which the
4 lanes of an x row read 64 contiguous bytes per load, whole sectors instead of halves of 4,
measured the same: an L1 load costs a wavefront per 128-byte line touched, 8 per load either
way; bench/experiments/nf4_ranges_x_sectors_h200_2026-11-26.json.) Scales: fp16, per
(G, b) the 8 pairs (absmax of row g, absmax of row g + 8), 4 bytes a lane. Both tensors keep the shapes
(N, K/2) and (N, K/64) so that `NF4Weight` reads the sizes as for every backend; rows of
two weights concatenate by concatenating memory (groups never straddle weights: N % 16 == 0).
Why fp16 scales: at 1 row the kernel is bound by its stream of bytes, and fp32 scales were 1/8 of them
(4.5 bits a weight against 4.25): a decode step at 1 row 2.209 -> 2.104 ms, at 32 rows 3.602 -> 3.560 (H100,
bench/results/h100_2026-11-27_s15_fp16_scales/). The weights are then code * absmax with absmax rounded to
fp16 (relative error <= 2^-11, as the fp16 W of the reference itself); the 32-row kernels (`scale_a`)
rounded it so before, and `to_fragments` rounds it once, at load (`NF4Weight.dequantize` of a "cuda" weight
is that of the rounded scales).

`nf4_dequantize` (prefill): W (N, K) in fp16, bit-identical to `NF4Weight.dequantize(torch.float16)`, for cuBLAS.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import threading
from typing import NamedTuple

import torch

BLOCKSIZE = 64  # the kernels' K block: bitsandbytes' default NF4 blocksize
GROUP = 16  # weight rows per MMA tile
WARPS = 16  # warps per CTA of the narrow kernels (one CTA per SM)


class Kernel(NamedTuple):
    """One instance of the template: up to `rows` rows of x, `tiles` column tiles of 8 rows, `groups`
    row groups of 16 weight rows per warp (sharing x's fragments), a ring of `ring` blocks, `warps` warps;
    `scale_a`: the looked-up weights are scaled in fp16 before the MMAs, which then sum straight into the
    accumulators (instead of each block's MMAs into fresh registers scaled once per block in fp32)."""

    name: str
    rows: int
    tiles: int
    groups: int
    ring: int
    warps: int
    scale_a: bool = False

    @property
    def reduce_bytes(self) -> int:  # the sums of a CTA's K ranges in shared memory
        return self.warps * self.groups * self.tiles * 512

    @property
    def swiglu(self) -> bool:  # has a `_swiglu` instance: a warp's groups pair gate's rows with up's
        return self.groups % 2 == 0


KERNELS = (
    Kernel("nf4_matmul", 8, 1, 2, 4, WARPS),
    Kernel("nf4_matmul16", 16, 2, 2, 4, WARPS),
    # 32 rows: the weights scaled in fp16 before the MMAs, which sum straight into the accumulators (`scale_a`:
    # 255 -> 193 registers for the wide one; per layer 106.8 -> 101.7 us, H200,
    # bench/experiments/nf4_ranges_scale_a_h200_2026-11-27.json). 12 warps of 2 groups (159 registers) for
    # o and down: 12.3 / 25.5 us against 12.5 / 28.4 for 16 warps of 1 group
    Kernel("nf4_matmul32", 32, 4, 2, 4, 12, scale_a=True),
    # 8 warps of 4 groups: each x fragment serves 4 groups, half the L1 loads of x per weight, which pays where N
    # gives each CTA enough groups (`kernel_for`): qkv 17.0 and gate_up 46.9 us against 16.9 / 51.8 for the 12 warps
    Kernel("nf4_matmul32w", 32, 4, 4, 2, 8, scale_a=True),
    # 64 rows: 8 warps of 2 groups, 8 column tiles, a ring of 2 (255 registers); per layer 156.9 us against
    # Triton's 169.4 (H200, bench/experiments/nf4_ranges_rows64_h200_2026-11-27.json)
    Kernel("nf4_matmul64", 64, 8, 2, 2, 8),
)
MAX_ROWS = max(kernel.rows for kernel in KERNELS)
GROUPS_PER_WARP = KERNELS[0].groups  # the 8-row kernel's (the experiments build on it)
REDUCE_BYTES = max(k.reduce_bytes for k in KERNELS if k.warps == WARPS)  # the narrow kernels' (below the table on sm90)
ENGINE_ROWS = 64  # engines of at most this many slots take these kernels (MISTRAL_T4_NF4_CUDA_ROWS: 1 to MAX_ROWS)


def kernel_for(m: int, n: int, sm_count: int) -> Kernel:
    """The kernel for x of m rows and N = n: the fewest rows >= m; at 32 rows the one of most groups per warp
    (nf4_matmul32w) where N has at least 2 row groups per SM (on 132 SMs qkv and gate_up), else the one of fewest
    (o and down, 256 groups: the wide one's best was 17.3 / 32.1 us against 12.3 / 28.6 for 16 warps of 1 group;
    H200, bench/experiments/nf4_ranges_wide32_h200_2026-11-26.json)."""
    rows = min(kernel.rows for kernel in KERNELS if kernel.rows >= m)
    fits = sorted((kernel for kernel in KERNELS if kernel.rows == rows), key=lambda kernel: kernel.groups)
    return fits[-1] if n // GROUP >= 2 * sm_count else fits[0]

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {  // read once: skip L1
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
// a lane's scales of one block: (absmax of row g, of row g + 8) as an fp16 pair, row g in the low half
__device__ __forceinline__ u32 ld_scales(const u32* p) { u32 r; asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p)); return r; }
__device__ __forceinline__ uint4 ld_x(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
// x's 16 values for lane 4g + c of K block b, in the fragment order (k = 64b + 16c + 4t + 2h + e for MMA t):
// x[64b + 16c .. + 15] of `row`, in two 16-byte loads (MMAs t = 0, 1 and t = 2, 3)
__device__ __forceinline__ const uint4* x_lane(const u16* x, int row, int stride_xm, int c) {
    return (const uint4*)(x + (size_t)row * stride_xm + c * 16);
}
__device__ __forceinline__ void ld_x_block(const uint4* xp, int b, uint4& lo, uint4& hi) {
    lo = ld_x(xp + b * 8);
    hi = ld_x(xp + b * 8 + 1);
}
// D += A B for one m16n8k16 tile. sm75 (T4) has no m16n8k16: two m16n8k8, A's registers (a0, a1) with b0 (k 2c, 2c + 1)
// and (a2, a3) with b1 (k 2c + 8, 2c + 9), the same fragments, so the layout below serves both
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a2), "r"(a3), "r"(b1));
#endif
}
__device__ __forceinline__ u32 word(uint4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ u16 to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) { u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r; }
__device__ __forceinline__ u32 lds(u32 address) { u32 r; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(address)); return r; }
__device__ __forceinline__ void mma0(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {  // C = 0
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
#else
    d[0] = d[1] = d[2] = d[3] = 0.f;
    mma(d, a0, a1, a2, a3, b0, b1);
#endif
}

// Programmatic dependent launch (sm90; no-ops when the grid was launched without it, and on older cards):
// `wait` blocks until the grids this one depends on have finished and their writes are visible;
// `launch_dependents` lets a grid launched after this one with the attribute start its CTAs early.
__device__ __forceinline__ void dependencies_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void dependents_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Where the CTA's shared window starts (0, or the 1 KB the driver reserves on sm90): the host
// sizes the dynamic shared memory so that a 64 KB-aligned table fits (`table_shared_bytes`).
extern "C" __global__ void smem_base(u32* out) {
    extern __shared__ __align__(16) unsigned char probe[];
    out[0] = (u32)__cvta_generic_to_shared(probe);
}

// This block's row groups first .. end - 1 (tile_groups from blockIdx.x) and K blocks of its split_k range
// (blockIdx.y), cut into `slices` ranges among its warps: warp w takes range s = w / per_slice (per_slice
// warps each) and the NG groups from G0 = first + (w % per_slice) NG; its K blocks kb0 .. kb1 - 1 of nb.
// Warps of a range >= slices idle (G0 = end).
struct Nf4Tile { int first, end, G0, nb, kb0, kb1, slice; };
template <int NG>
__device__ __forceinline__ Nf4Tile nf4_tile(int N, int K, int split_k, int tile_groups, int warp, int slices = 1,
                                             int per_slice = 1 << 30) {
    Nf4Tile t;
    t.slice = warp / per_slice;
    t.first = blockIdx.x * tile_groups;
    t.end = min(N >> 4, t.first + tile_groups);
    t.G0 = t.slice < slices ? t.first + (warp - t.slice * per_slice) * NG : t.end;
    t.nb = K >> 6;
    const int per = (t.nb + split_k - 1) / split_k;
    t.kb0 = blockIdx.y * per;
    t.kb1 = min(t.kb0 + per, t.nb);
    if (slices > 1) {
        const int in_slice = (t.kb1 - t.kb0 + slices - 1) / slices;
        t.kb0 = min(t.kb0 + t.slice * in_slice, t.kb1);
        t.kb1 = min(t.kb0 + in_slice, t.kb1);
    }
    return t;
}

// SiLU(gate) * up as eager fp16 PyTorch computes it from the projection's fp16 outputs: silu in fp32, rounded, times up.
__device__ __forceinline__ float from_half(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 swiglu(float gate, float up) {
    const float g = from_half(to_half(gate));
    return to_half(from_half(to_half(g / (1.f + expf(-g)))) * from_half(to_half(up)));
}

// The RMSNorms between the matmuls, folded into them (`nf4_matmul(..., residual= / sq=)`; the template's NORM, in
// `_residual` / `_scaled` instances: the plain kernels are compiled as if this did not exist):
// NORM_RESIDUAL (o, down): the product is the residual stream's delta: stores resid_out = resid + x W^T (rounded to
//   fp16 as eager PyTorch adds), xw_out = resid_out * norm_w (rounded), and sq (M, N / 16) the sums of resid_out^2
//   (fp32) over each 16 outputs; `out` is not written.
// NORM_SCALED (qkv, gate/up after it): x is such an xw and sq its sums; each row's result is times
//   r = 1 / sqrt(sum(sq) / K + eps) before it is rounded (the row's RMSNorm, applied after the matmul).
// Both in the epilogue: the main loop is the plain matmul's.
enum { NORM_NONE = 0, NORM_RESIDUAL = 1, NORM_SCALED = 2 };
struct Nf4Norm {
    const u16* resid; u16* resid_out; u16* xw_out; const u16* norm_w; float* sq; float eps;
};
template <int NORM> struct NormTag {};  // deduces nf4_matmul_store's NORM
__device__ __forceinline__ float warp_sum(float v, int from) {  // over lanes that differ in bits >= from
    #pragma unroll
    for (int bit = 16; bit >= 1; bit >>= 1)
        if (bit >= from) v += __shfl_xor_sync(0xffffffffu, v, bit);
    return v;
}
__device__ __forceinline__ float half_sum(float v) {  // over the 16 lanes of a half warp
    #pragma unroll
    for (int bit = 8; bit >= 1; bit >>= 1) v += __shfl_xor_sync(0xffffffffu, v, bit);
    return v;
}
// NORM_RESIDUAL's element (m, n): the residual `resid` and norm weight `weight` (loaded by the caller, all of a lane's
// first: a load after a store would wait for it) and the delta `d` (fp32 sum); stores the sum and xw, returns its square
__device__ __forceinline__ float residual_store(const Nf4Norm& norm, int m, int n, int N, float d, u16 resid, u16 weight) {
    const size_t at = (size_t)m * N + n;
    const u16 sum = to_half(from_half(resid) + from_half(to_half(d)));
    norm.resid_out[at] = sum;
    norm.xw_out[at] = to_half(from_half(sum) * from_half(weight));
    const float s = from_half(sum);
    return s * s;
}
__device__ __forceinline__ u16 ld_half(const u16* p) { return __ldcg((const unsigned short*)p); }
// NORM_RESIDUAL's inputs of a warp's NO output groups from G0 (those < end): the residual at the lane's elements
// of the accumulator (rows m < M) and the norm weight at its columns. The body loads them before it waits for the
// kernel before it (`residual` and `norm_w` must be older than that kernel: in a decoder layer, the residual stream).
template <int NO, int NT> struct ResidualIn { u16 resid[NO][NT][4], weight[NO][2]; };
template <int NO, int NT>
__device__ __forceinline__ void residual_loads(ResidualIn<NO, NT>& in, const Nf4Norm& norm, int M, int N, int G0, int end) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int q = 0; q < NO; q++) {
        const bool live = G0 + q < end;
        #pragma unroll
        for (int h = 0; h < 2; h++) in.weight[q][h] = live ? ld_half(norm.norm_w + (G0 + q) * 16 + g + 8 * h) : 0;
        #pragma unroll
        for (int nt = 0; nt < NT; nt++)
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                const int m = nt * 8 + 2 * c + (i & 1), n = (G0 + q) * 16 + g + 8 * (i >> 1);
                in.resid[q][nt][i] = live && m < M ? ld_half(norm.resid + (size_t)m * N + n) : 0;
            }
    }
}
// NORM_SCALED's r of row m, which the block keeps in the unused halves of the table's rows 1 and 2
__device__ __forceinline__ u32 row_scale_at(u32 table, int m) { return table + 256 * (1 + (m >> 5)) + 128 + 4 * (m & 31); }
__device__ __forceinline__ float row_scale(u32 table, int m) {
    float r;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(r) : "r"(row_scale_at(table, m)));
    return r;
}

// The block's results: acc[q][nt][2h + e] = out[m = 8 nt + 2c + e, n = 16 (G0 + q) + g + 8h] (G0 + q < end),
// stored, or with split-K written as partials that the block arriving last sums in split order into out.
// SWIGLU: W is the fused gate/up weight (gate's N/2 rows, then up's) and out (M, N/2) = SiLU(x gate^T) * (x up^T);
// the warp's groups q < NG/2 are gate's, q + NG/2 the up rows of the same outputs, and G0 / first / end count
// output groups (partials keep both halves: gate at n, up at n + N/2). `flag`: a shared-memory word.
// Every thread of the block calls it.
// NORM (`norm`: see Nf4Norm): NORM_SCALED's row scales are in shared memory (`row_scale`); NORM_RESIDUAL's inputs
// in `ahead`, loaded by the body before its wait (`residual_loads`; split_k > 1 loads its own in the last CTA).
template <int NT, int NG, int WARPS, bool SWIGLU, int NORM = NORM_NONE>
__device__ __forceinline__ void nf4_matmul_store(
        const float (&acc)[NG][NT][4], u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ counters,
        int M, int N, int stride_om, int split_k, int first, int end, int G0, u32 flag,
        const Nf4Norm& norm = Nf4Norm{}, u32 table = 0, NormTag<NORM> = NormTag<NORM>{},
        const ResidualIn<SWIGLU ? NG / 2 : NG, NT>* ahead = nullptr) {
    constexpr int NO = SWIGLU ? NG / 2 : NG;  // output groups per warp
    const int half = N >> 1;
    const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, c = lane & 3;
    constexpr bool residual = !SWIGLU && NORM == NORM_RESIDUAL;
    if (split_k == 1) {
        #pragma unroll
        for (int q = 0; q < NO; q++) {
            if (G0 + q >= end) break;
            #pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                float squares[2] = {0.f, 0.f};  // NORM_RESIDUAL: rows 8 nt + 2c + e, this lane's columns g and g + 8
                #pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int m = nt * 8 + 2 * c + (i & 1), n = (G0 + q) * 16 + g + 8 * (i >> 1);
                    if constexpr (residual) {
                        if (m < M)
                            squares[i & 1] += residual_store(norm, m, n, N, acc[q][nt][i], ahead->resid[q][nt][i],
                                                           ahead->weight[q][i >> 1]);
                    } else if constexpr (NORM == NORM_SCALED) {
                        if (m < M) {
                            const float r = row_scale(table, m);
                            out[(size_t)m * stride_om + n] = SWIGLU ? swiglu(r * acc[q][nt][i], r * acc[q + NO * SWIGLU][nt][i])
                                                                    : to_half(r * acc[q][nt][i]);
                        }
                    } else {
                        if (m < M) out[(size_t)m * stride_om + n] = SWIGLU ? swiglu(acc[q][nt][i], acc[q + NO * SWIGLU][nt][i])
                                                                           : to_half(acc[q][nt][i]);
                    }
                }
                if constexpr (residual) {  // each row's sum over the group's 16 columns: over g (lanes 4 apart), in a fixed order
                    #pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const float total = warp_sum(squares[e], 4);
                        const int m = nt * 8 + 2 * c + e;
                        if (g == 0 && m < M) norm.sq[(size_t)m * (N >> 4) + G0 + q] = total;
                    }
                }
            }
        }
        return;
    }
    #pragma unroll
    for (int q = 0; q < NG; q++) {
        const int G = G0 + (SWIGLU && q >= NO ? q - NO : q);
        if (G >= end) continue;
        #pragma unroll
        for (int nt = 0; nt < NT; nt++)
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                const int m = nt * 8 + 2 * c + (i & 1), n = G * 16 + g + 8 * (i >> 1) + (SWIGLU && q >= NO ? half : 0);
                if (m < M) partial[((size_t)blockIdx.y * M + m) * N + n] = acc[q][nt][i];
            }
    }
    __threadfence();  // every partial of this block is visible before the counter says so
    __syncthreads();
    if (tid == 0) {
        const u32 last = atomicAdd(counters + blockIdx.x, 1) == split_k - 1;
        asm volatile("st.shared.u32 [%0], %1;" :: "r"(flag), "r"(last));
    }
    __syncthreads();
    u32 last;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(last) : "r"(flag));
    if (!last) return;
    __threadfence();
    const int rows = (end - first) * 16;  // the block's tile, element by element
    if constexpr (residual) {  // (16 in a row: one group of a row) in whole warps, for the sums of squares
        for (int e0 = tid - lane; e0 < rows * M; e0 += WARPS * 32) {
            const int e = e0 + lane;
            const bool live = e < rows * M;
            const int m = live ? e / rows : 0, n = first * 16 + (live ? e % rows : 0);
            float total = 0.f;
            for (int k = 0; live && k < split_k; k++) {  // in split order: the same sum every call
                float v;
                asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(partial + ((size_t)k * M + m) * N + n));
                total += v;
            }
            const float sum = half_sum(live ? residual_store(norm, m, n, N, total, ld_half(norm.resid + (size_t)m * N + n),
                                                             ld_half(norm.norm_w + n)) : 0.f);
            if (live && (e & 15) == 0) norm.sq[(size_t)m * (N >> 4) + (n >> 4)] = sum;
        }
    } else {
        for (int e = tid; e < rows * M; e += WARPS * 32) {
            const int m = e / rows, n = first * 16 + e % rows;
            float total = 0.f, up = 0.f;
            for (int k = 0; k < split_k; k++) {  // in split order: the same sum every call
                float v;
                asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(partial + ((size_t)k * M + m) * N + n));
                total += v;
                if (SWIGLU) {
                    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(partial + ((size_t)k * M + m) * N + n + half));
                    up += v;
                }
            }
            if constexpr (NORM == NORM_SCALED) {
                const float r = row_scale(table, m);
                total *= r;
                up *= r;
            }
            out[(size_t)m * stride_om + n] = SWIGLU ? swiglu(total, up) : to_half(total);
        }
    }
    if (tid == 0) counters[blockIdx.x] = 0;
}

// out (M, N) = x (M, K) @ W.T for M <= 8 NT. Grid (cdiv(N / 16, tile_groups), split_k), 32 WARPS threads:
// block x owns the tile_groups (<= WARPS NG / slices) row groups from tile_groups x, block y a K range,
// which its warps cut into `slices` ranges (nf4_tile; warps past the tile's end idle); the ranges' sums
// meet in shared memory (range order: the same sum every call). Dynamic shared memory: table_shared_bytes,
// and REDUCE_BYTES more when slices > 1 unless the window has them below the table. counters: >= gridDim.x
// ints, zero on entry and on exit. SWIGLU (W the fused gate/up weight, out (M, N / 2)): the same over the
// N / 2 outputs, grid (cdiv(N / 32, tile_groups), split_k), each warp on NG / 2 outputs' gate and up groups.
template <int NT, int NG, int D, int WARPS, bool SWIGLU, bool SCALE_A = false, int NORM = NORM_NONE>
__device__ __forceinline__ void nf4_matmul_body(
        const u16* __restrict__ x, const uint4* __restrict__ wq, const u32* __restrict__ scales,
        const u16* __restrict__ code, u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ counters,
        int M, int N, int K, int stride_xm, int stride_om, int split_k, int tile_groups, int slices = 1,
        const Nf4Norm norm = Nf4Norm{}) {
    extern __shared__ __align__(16) unsigned char window[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 base = (u32)__cvta_generic_to_shared(window);
    const u32 table = (base + 0xFFFFu) & ~0xFFFFu;  // 256 rows of 256 bytes on a 64 KB boundary
    // the ranges' sums (WARPS NG NT 4 floats per lane): below the table where the window has room (sm90), else after it
    const u32 reduce = table - base >= WARPS * NG * NT * 512 ? base : table + 65536u;
    {
        u32 size;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
        const u32 needed = slices > 1 && reduce != base ? reduce + WARPS * NG * NT * 512 : table + 65536u;
        if (needed > base + size) __trap();  // the host asked for too little
    }
    static_assert(!SWIGLU || NG % 2 == 0, "SwiGLU pairs a warp's gate groups with its up groups");
    constexpr int NO = SWIGLU ? NG / 2 : NG;  // output groups per warp (nf4_matmul_store)
    const int per_slice = WARPS / slices;
    const Nf4Tile tile = nf4_tile<NO>(SWIGLU ? N >> 1 : N, K, split_k, tile_groups, warp, slices, per_slice);
    const int first = tile.first, end = tile.end, G0 = tile.G0, nb = tile.nb, kb0 = tile.kb0, kb1 = tile.kb1;
    const int g = lane >> 2, c = lane & 3;
    // RUN: the weight, scale and x pointers run with the loads, one add per load, where the loop would otherwise derive
    // each address again from G and b (ptxas rematerialises them under register pressure: 756 -> 662 instructions per
    // 2 blocks in the wide 32-row kernel, 860 -> 673 in the narrow one). Not at 64 rows (NT = 8): at 232 registers
    // the running pointers spill there
    constexpr bool RUN = NT < 8;
    // the ring's first loads go out before the table is built: its stores and barrier wait under them
    const uint4* wp[NG];
    const u32* sp[NG];
    #pragma unroll
    for (int q = 0; q < NG; q++) {
        // past the tile's end: recompute its last group, never stored; SWIGLU: groups q >= NO are up's, N / 32 groups on
        const int G = SWIGLU && q >= NO ? min(G0 + q - NO, end - 1) + (N >> 5) : min(G0 + q, end - 1);
        wp[q] = wq + ((size_t)G * nb + (RUN ? kb0 : 0)) * 32 + lane;
        sp[q] = scales + ((size_t)G * nb + (RUN ? kb0 : 0)) * 8 + g;
    }
    uint4 wr[D][NG];
    u32 sr[D][NG];
    if (G0 < end) {
        #pragma unroll
        for (int d = 0; d < D; d++) {
            const int b = RUN ? d : kb0 + d;  // RUN: from the pointers at kb0
            if (kb0 + d < kb1) {
                #pragma unroll
                for (int q = 0; q < NG; q++) { wr[d][q] = ld_stream(wp[q] + (size_t)b * 32); sr[d][q] = ld_scales(sp[q] + (size_t)b * 8); }
            }
        }
    }
    if constexpr (RUN) {  // from here at the block the ring takes next: kb0 + D, then one more per refill
        #pragma unroll
        for (int q = 0; q < NG; q++) { wp[q] += D * 32; sp[q] += D * 8; }
    }
    constexpr bool residual_ahead = !SWIGLU && NORM == NORM_RESIDUAL;  // its epilogue's inputs, before the wait
    ResidualIn<NO, NT> ahead;
    if constexpr (residual_ahead) {
        if (split_k == 1 && tile.slice == 0) residual_loads(ahead, norm, M, N, G0, end);
    }
    for (int i = tid; i < 2048; i += WARPS * 32) {  // row b = i >> 3: 8 x 16 bytes = its 32 copies
        const int b = i >> 3;
        const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);
        asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};" :: "r"(table + b * 256 + (i & 7) * 16), "r"(v));
    }
    const u32 flag = table + 128;  // in row 0's unused half
    __syncthreads();
    dependencies_wait();  // launched early (`early`): weights and table above, x and outputs only from here
    // prmt(word, lane_base, 0x76j4) = table + 256 * (byte j of word) + 4 * lane: one instruction
    const u32 lane_base = table | (lane << 2);
    float acc[NG][NT][4];
    #pragma unroll
    for (int q = 0; q < NG; q++)
        #pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[q][nt][0] = acc[q][nt][1] = acc[q][nt][2] = acc[q][nt][3] = 0.f;
    if (G0 < end) {
        const uint4* xp[NT];  // lane row g of the B tile is x's row 8 nt + g; rows past M read row M - 1:
        #pragma unroll        // they only make output columns that are never stored
        for (int nt = 0; nt < NT; nt++) xp[nt] = x_lane(x, min(nt * 8 + g, M - 1), stride_xm, c) + (RUN ? kb0 * 8 : 0);
        for (int b0 = kb0; b0 < kb1; b0 += D) {
            #pragma unroll
            for (int d = 0; d < D; d++) {
                const int b = b0 + d;
                if (b < kb1) {
                    uint4 xv[NT][2];
                    #pragma unroll
                    for (int nt = 0; nt < NT; nt++) {
                        ld_x_block(xp[nt], RUN ? 0 : b, xv[nt][0], xv[nt][1]);
                        if (RUN) xp[nt] += 8;
                    }
                    #pragma unroll
                    for (int q = 0; q < NG; q++) {
                        float block[NT][4];  // this block's sums, scaled once below (not SCALE_A)
                        // absmax of rows g (low half: A registers a0, a2) and g + 8 (high: a1, a3)
                        const float s0 = SCALE_A ? 0.f : from_half((u16)(sr[d][q] & 0xFFFF));
                        const float s1 = SCALE_A ? 0.f : from_half((u16)(sr[d][q] >> 16));
                        u32 scale_g = 0, scale_g8 = 0;  // SCALE_A: each as an fp16 pair
                        if constexpr (SCALE_A) {
                            const u32 both = sr[d][q];
                            scale_g = prmt(both, both, 0x1010);
                            scale_g8 = prmt(both, both, 0x3232);
                        }
                        #pragma unroll
                        for (int t = 0; t < 4; t++) {
                            const u32 w = word(wr[d][q], t);
                            u32 a0 = lds(prmt(w, lane_base, 0x7604));
                            u32 a1 = lds(prmt(w, lane_base, 0x7614));
                            u32 a2 = lds(prmt(w, lane_base, 0x7624));
                            u32 a3 = lds(prmt(w, lane_base, 0x7634));
                            if constexpr (SCALE_A) {  // the weights in fp16 (code and absmax each rounded first)
                                a0 = hmul2(a0, scale_g);
                                a1 = hmul2(a1, scale_g8);
                                a2 = hmul2(a2, scale_g);
                                a3 = hmul2(a3, scale_g8);
                            }
                            #pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                const uint4 xw = xv[nt][t >> 1];
                                if (SCALE_A) mma(acc[q][nt], a0, a1, a2, a3, word(xw, (2 * t) & 3), word(xw, (2 * t + 1) & 3));
                                else if (t == 0) mma0(block[nt], a0, a1, a2, a3, word(xw, 0), word(xw, 1));
                                else mma(block[nt], a0, a1, a2, a3, word(xw, (2 * t) & 3), word(xw, (2 * t + 1) & 3));
                            }
                        }
                        if constexpr (!SCALE_A) {  // block[nt][2h + e]: weight row g + 8h, so s0 (h = 0) or s1 (h = 1)
                            #pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                acc[q][nt][0] = fmaf(s0, block[nt][0], acc[q][nt][0]);
                                acc[q][nt][1] = fmaf(s0, block[nt][1], acc[q][nt][1]);
                                acc[q][nt][2] = fmaf(s1, block[nt][2], acc[q][nt][2]);
                                acc[q][nt][3] = fmaf(s1, block[nt][3], acc[q][nt][3]);
                            }
                        }
                    }
                    if (b + D < kb1) {  // refill the slot just used: no register copies
                        #pragma unroll
                        for (int q = 0; q < NG; q++) {
                            const size_t at = RUN ? 0 : b + D;
                            wr[d][q] = ld_stream(wp[q] + at * 32);
                            sr[d][q] = ld_scales(sp[q] + at * 8);
                            if (RUN) { wp[q] += 32; sp[q] += 8; }
                        }
                    }
                }
            }
        }
    }
    dependents_launch();
    if constexpr (NORM == NORM_SCALED) {  // each row's r from the sums of squares (sq: (M, K / 16)), rows m = w, w + WARPS..
        constexpr int ROWS = (8 * NT + WARPS - 1) / WARPS;  // for warp w = WARPS - 1 - warp: the last warps, often idle
        const int chunks = K >> 6;  // float4 per row
        float totals[ROWS];
        #pragma unroll
        for (int j = 0; j < ROWS; j++) {  // every load of the warp before the first sum waits: no branches
            const int m = WARPS - 1 - warp + j * WARPS;  // (rows past M read row M - 1, never used)
            const float4* p = (const float4*)(norm.sq + (size_t)min(m, M - 1) * (K >> 4));
            totals[j] = 0.f;
            #pragma unroll 4
            for (int i = lane; i < chunks; i += 32) {  // in a fixed order: the same r every call
                const float4 v = __ldcg(p + i);
                totals[j] += (v.x + v.y) + (v.z + v.w);
            }
        }
        #pragma unroll
        for (int j = 0; j < ROWS; j++) {
            const int m = WARPS - 1 - warp + j * WARPS;
            const float total = warp_sum(totals[j], 1);
            if (lane == 0 && m < M)
                asm volatile("st.shared.f32 [%0], %1;" :: "r"(row_scale_at(table, m)), "f"(1.f / sqrtf(total / K + norm.eps)));
        }
        if (slices == 1) __syncthreads();  // (with ranges, their barrier below)
    }
    if (slices > 1) {  // range 0's warps add the other ranges' sums to theirs, in range order
        if (tile.slice > 0) {
            #pragma unroll
            for (int q = 0; q < NG; q++)
                #pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    #pragma unroll
                    for (int i = 0; i < 4; i++)
                        asm volatile("st.shared.f32 [%0], %1;"
                                     :: "r"(reduce + (((warp * NG + q) * NT + nt) * 4 + i) * 128 + lane * 4), "f"(acc[q][nt][i]));
        }
        __syncthreads();
        if (tile.slice == 0)
            for (int s = 1; s < slices; s++) {
                const int other = warp + s * per_slice;
                #pragma unroll
                for (int q = 0; q < NG; q++)
                    #pragma unroll
                    for (int nt = 0; nt < NT; nt++)
                        #pragma unroll
                        for (int i = 0; i < 4; i++) {
                            float v;
                            asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v)
                                         : "r"(reduce + (((other * NG + q) * NT + nt) * 4 + i) * 128 + lane * 4));
                            acc[q][nt][i] += v;
                        }
            }
    }
    nf4_matmul_store<NT, NG, WARPS, SWIGLU>(acc, out, partial, counters, M, N, stride_om, split_k, first, end,
                                            tile.slice == 0 ? G0 : end, flag, norm, table, NormTag<NORM>{},
                                            residual_ahead ? &ahead : nullptr);
}

#define NF4_KERNEL(NAME, NT, NG, D, WARPS, SWIGLU, SCALE_A) \
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) NAME(const u16* x, const uint4* wq, const u32* scales, \
        const u16* code, u16* out, float* partial, int* counters, int M, int N, int K, int stride_xm, int stride_om, \
        int split_k, int tile_groups, int slices) { \
    nf4_matmul_body<NT, NG, D, WARPS, SWIGLU, SCALE_A>(x, wq, scales, code, out, partial, counters, M, N, K, stride_xm, \
                                                       stride_om, split_k, tile_groups, slices); }
// the same with the RMSNorm's part (NORM: NORM_RESIDUAL, the `_residual` instance, or NORM_SCALED, `_scaled`)
#define NF4_NORM_KERNEL(NAME, NT, NG, D, WARPS, SWIGLU, SCALE_A, NORM) \
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) NAME(const u16* x, const uint4* wq, const u32* scales, \
        const u16* code, u16* out, float* partial, int* counters, int M, int N, int K, int stride_xm, int stride_om, \
        int split_k, int tile_groups, int slices, const u16* resid, u16* resid_out, u16* xw_out, const u16* norm_w, \
        float* sq, float eps) { \
    nf4_matmul_body<NT, NG, D, WARPS, SWIGLU, SCALE_A, NORM>(x, wq, scales, code, out, partial, counters, M, N, K, \
        stride_xm, stride_om, split_k, tile_groups, slices, Nf4Norm{resid, resid_out, xw_out, norm_w, sq, eps}); }
// instances: `instance()` below (SWIGLU: NAME_swiglu, out (M, N / 2) = SiLU(x gate^T) * (x up^T) for the fused
// gate/up weight, nf4_matmul_store)

// W (N, K) row-major in fp16: fp32 code * absmax rounded once, as the reference. One thread per
// 16-byte lane chunk: rows g and g + 8 of its group, 16 consecutive k each.
extern "C" __global__ void __launch_bounds__(256) nf4_dequantize(
        const uint4* __restrict__ wq, const u32* __restrict__ scales, const float* __restrict__ code,
        u16* __restrict__ out, int N, int K) {
    const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (G, b, lane)
    const int nb = K >> 6;
    if (chunk >= (long long)(N >> 4) * nb * 32) return;
    const int lane = (int)(chunk & 31), g = lane >> 2, c = lane & 3;
    const long long gb = chunk >> 5;
    const int G = (int)(gb / nb), b = (int)(gb % nb);
    const uint4 w = wq[chunk];
    const u32 pair = scales[gb * 8 + g];
    const float2 s = make_float2(from_half((u16)(pair & 0xFFFF)), from_half((u16)(pair >> 16)));
    __align__(16) u16 row0[16], row1[16];
    #pragma unroll
    for (int t = 0; t < 4; t++) {
        const u32 q = word(w, t);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 byte = (q >> (8 * j)) & 0xFF;
            const int h = j >> 1, k = 4 * t + 2 * h;
            u16* row = (j & 1) ? row1 : row0;
            const float scale = (j & 1) ? s.y : s.x;
            row[k] = to_half(code[byte & 15] * scale);
            row[k + 1] = to_half(code[byte >> 4] * scale);
        }
    }
    u16* dst = out + (size_t)(G * 16 + g) * K + b * 64 + c * 16;
    *(uint4*)dst = *(uint4*)row0;
    *((uint4*)dst + 1) = *((uint4*)row0 + 1);
    dst += (size_t)8 * K;
    *(uint4*)dst = *(uint4*)row1;
    *((uint4*)dst + 1) = *((uint4*)row1 + 1);
}
"""


# ---------------------------------------------------------------- layout (any device, plain PyTorch)


# the package's instances (`KERNELS`)
NORM_ROWS = 16  # the kernels of at most this many rows have `_residual` / `_scaled` instances (`norm_kernels`)
NORMS = {"residual": 1, "scaled": 2}  # the source's NORM_RESIDUAL, NORM_SCALED


def instance(kernel: Kernel, swiglu: bool = False, norm: str | None = None) -> str:
    """The source line that instantiates `kernel` (its `_swiglu` instance with `swiglu`; with `norm` its
    `_residual` / `_scaled` (`_scaled_swiglu`) instance, which carries a part of the RMSNorm, `Nf4Norm`)."""
    args = (f"{kernel.tiles}, {kernel.groups}, {kernel.ring}, {kernel.warps}, {str(bool(swiglu)).lower()}, "
            f"{str(bool(kernel.scale_a)).lower()}")
    if norm is None:
        return f"NF4_KERNEL({kernel.name}{'_swiglu' if swiglu else ''}, {args})\n"
    return f"NF4_NORM_KERNEL({kernel_name(kernel, swiglu, norm)}, {args}, {NORMS[norm]})\n"


def kernel_name(kernel: Kernel, swiglu: bool = False, norm: str | None = None) -> str:
    return kernel.name + (f"_{norm}" if norm else "") + ("_swiglu" if swiglu else "")


def norm_kernels() -> list[tuple[Kernel, bool, str]]:
    """(kernel, swiglu, norm) of every instance with a part of the RMSNorm: o and down take `_residual`, qkv
    `_scaled` and gate/up `_scaled_swiglu`, up to NORM_ROWS rows (`kernels.norms_in_matmuls`)."""
    return [(k, swiglu, norm) for k in KERNELS if k.rows <= NORM_ROWS for norm in NORMS
            for swiglu in ((False, True) if norm == "scaled" and k.swiglu else (False,))]


SOURCE += ("".join(instance(k) for k in KERNELS) + "".join(instance(k, swiglu=True) for k in KERNELS if k.swiglu)
           + "".join(instance(*spec) for spec in norm_kernels()))


def supports(out_features: int, in_features: int, blocksize: int) -> bool:
    """The fragment layout needs whole 16-row groups and 64-weight blocks."""
    return blocksize == BLOCKSIZE and out_features % GROUP == 0 and in_features % BLOCKSIZE == 0


def to_fragments(packed: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' (N, K/2) bytes + (N, K/64) fp32 scales -> the fragment layout, same shapes, the scales
    rounded to fp16."""
    n, k = packed.shape[0], packed.shape[1] * 2
    assert absmax.shape == (n, k // BLOCKSIZE) and supports(n, k, BLOCKSIZE), f"no fragment layout for {n}x{k}"
    groups, blocks = n // GROUP, k // BLOCKSIZE
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1)  # 4-bit indices in K order
    # (G, rh, g, b, c, t, h, e) -> (G, b, g, c, t, h, rh, e); rows 16G + 8rh + g, k 64b + 16c + 4t + 2h + e
    q = q.view(groups, 2, 8, blocks, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 6, 1, 7)
    fragments = (q[..., 0] | (q[..., 1] << 4)).contiguous().view(n, k // 2)
    scales = absmax.view(groups, 2, 8, blocks).permute(0, 3, 2, 1).half().contiguous().view(n, blocks)
    return fragments, scales


def from_fragments(fragments: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fragment layout -> bitsandbytes' (N, K/2) bytes and row-major (N, K/64) fp32 scales."""
    n, k = fragments.shape[0], fragments.shape[1] * 2
    groups, blocks = n // GROUP, k // BLOCKSIZE
    f = fragments.view(groups, blocks, 8, 4, 4, 2, 2)  # (G, b, g, c, t, h, rh)
    q = torch.stack([f & 0xF, f >> 4], dim=-1)  # (..., e)
    q = q.permute(0, 6, 2, 1, 3, 4, 5, 7).reshape(n, k)  # (G, rh, g, b, c, t, h, e)
    packed = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()
    absmax = scales.view(groups, blocks, 8, 2).permute(0, 3, 2, 1).reshape(n, blocks).float().contiguous()
    return packed, absmax


CTA_COST, SPLIT_COST = 135, 70  # in row-group blocks: a CTA's fixed cost; a split across CTAs' (partials, last CTA)


@functools.cache  # every call of nf4_matmul asks; a search over ~100 candidates each time in eager decode
def matmul_geometry(n: int, k: int, sm_count: int, ranges: bool = True,
                    groups_per_warp: int = GROUPS_PER_WARP, warps: int = WARPS) -> tuple[int, int, int]:
    """(row groups per CTA, split-K across CTAs, K ranges per CTA) for nf4_matmul.

    A CTA of T row groups keeps T / groups_per_warp warps per K range, so its warps cut its K
    blocks into as many ranges as they make (at least 4 blocks each) and add the ranges' sums in
    shared memory; a split across CTAs writes partial sums to global memory, which the last CTA
    of a tile adds. One CTA fills an SM (127 KB of shared memory), so a grid runs in
    ceil(CTAs / SMs) waves, each as long as its CTAs' work: T x K blocks (the longest range's
    times the ranges) + CTA_COST, plus SPLIT_COST once if split across CTAs. Fitted on the
    H200 at 1 row (bench/experiments/nf4_wide.py's geometry sweep: 0.029 us per group-block,
    ~3.9 us per CTA, ~2 us for a split). Over even T and power-of-two splits of >= 4 K blocks
    each, the least cost; ties go to the smaller split, then more groups per CTA. On 132 SMs:
    qkv (4, 1, 8) = 96 CTAs, o and down (2, 1, 16), gate_up (14, 1, 2); with 1 group per warp
    qkv (4, 1, 4), o and down (2, 1, 8), gate_up (14, 1, 1), which a sweep at 32 rows found best
    too (bench/experiments/nf4_ranges.py); the 32-row kernels: 12 warps of 2 groups o and down
    (2, 1, 12), 8 warps of 4 groups qkv (4, 1, 8) and gate_up (14, 1, 2), each its sweep's best or
    within 2% (bench/experiments/nf4_ranges_scale_a_h200_2026-11-27.json).
    `ranges=False`: one K range per CTA (a T4, where a block holds the table alone; kernels of the experiments
    that have no ranges), and tiles that keep at least half of a CTA's warps busy (each warp then sums its
    groups over the whole K range, so a CTA of few groups leaves its SM idle: untuned, no T4 was available)."""
    groups, blocks = n // GROUP, k // BLOCKSIZE
    best = None
    for tile in range(2 if ranges else max(2, warps * groups_per_warp // 4 * 2), warps * groups_per_warp + 1, 2):
        split = 1
        while True:
            per_split = -(-blocks // split)
            slices = max(1, min(warps // -(-tile // groups_per_warp), per_split // 4)) if ranges else 1
            waves = -(-(-(-groups // tile) * split) // sm_count)
            cost = waves * (min(tile, groups) * slices * -(-per_split // slices) + CTA_COST) + (split > 1) * SPLIT_COST
            key = (cost, split, -tile)
            if best is None or key < best[0]:
                best = (key, tile, split, slices)
            if split >= 16 or blocks < 8 * split:
                break
            split *= 2
    return best[1:]


# ---------------------------------------------------------------- NVRTC + driver API (GPU only)


class _Module:
    """CUDA C++ `source` compiled by NVRTC for one device (or `arch`), launched through the driver API."""

    def __init__(self, device: torch.device, source: str = SOURCE, arch: str | None = None):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(device)
        self.cubin, self.log = compiled(source, arch or f"sm_{major}{minor}")
        self.cuda = ctypes.CDLL("libcuda.so.1")
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # the primary context exists and is current
            self.module = ctypes.c_void_p()
            _check(self.cuda, self.cuda.cuModuleLoadData(ctypes.byref(self.module), self.cubin), "cuModuleLoadData")
        self.functions = {}
        self.shared_set = {}
        # programmatic dependent launch: sm90, and code built for it (PTX of an older arch has no griddepcontrol.wait)
        self.early = (major, minor) >= (9, 0) and arch_number(arch, 90) >= 90

    def function(self, name: str) -> ctypes.c_void_p:
        if name not in self.functions:
            f = ctypes.c_void_p()
            _check(self.cuda, self.cuda.cuModuleGetFunction(ctypes.byref(f), self.module, name.encode()), name)
            self.functions[name] = f
        return self.functions[name]

    def launch(self, name: str, grid: tuple[int, int], block: int, args: list, shared: int = 0,
               early: bool = False) -> None:
        """Launch `name` on PyTorch's current stream (so CUDA graphs capture it); ints go as C ints, floats as C floats.

        `shared`: bytes of dynamic shared memory (`extern __shared__`); the limit is raised to it once per function.
        `early`: programmatic dependent launch (sm90; ignored on older cards): the grid may start while
        the previous one finishes; the kernel must `dependencies_wait()` before it reads what that one wrote."""
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
                  else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        function = self.function(name)
        if torch.cuda.current_device() != self.index:  # the driver launches in the current device's context
            with torch.cuda.device(self.index):
                return self.launch(name, grid, block, args, shared, early)
        if shared > self.shared_set.get(name, 0):  # even under 48 KB: static + dynamic may pass it
            rc = self.cuda.cuFuncSetAttribute(function, 8, shared)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(self.cuda, rc, f"{shared} bytes of shared memory for {name}")
            self.shared_set[name] = shared
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.index).cuda_stream)
        if early and self.early:
            attribute = _LaunchAttribute(id=6)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attribute.value[0] = 1
            config = _LaunchConfig(grid[0], grid[1], 1, block, 1, 1, shared, stream, ctypes.pointer(attribute), 1)
            rc = self.cuda.cuLaunchKernelEx(ctypes.byref(config), function, pointers, None)
        else:
            rc = self.cuda.cuLaunchKernel(function, grid[0], grid[1], 1, block, 1, 1, shared, stream, pointers, None)
        _check(self.cuda, rc, f"launch of {name}")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id and a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("count", ctypes.c_uint)]


def _check(cuda, rc: int, what: str) -> None:
    if rc != 0:
        message = ctypes.c_char_p()
        cuda.cuGetErrorString(rc, ctypes.byref(message))
        raise RuntimeError(f"CUDA driver: {what} failed: {rc} {message.value and message.value.decode()}")


def nvrtc_library() -> str | None:
    """Path of NVRTC: PyTorch's CUDA wheels ship it (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib, torch/lib)."""
    roots = [os.path.join(torch.__path__[0], "lib")]
    site = os.path.dirname(torch.__path__[0])
    roots += glob.glob(os.path.join(site, "nvidia", "*", "lib")) + [os.path.join(site, "nvidia", "lib")]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "libnvrtc.so*")) + glob.glob(os.path.join(root, "libnvrtc-*.so*")))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[-1]
    for name in ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"):  # a system CUDA toolkit
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def _nvrtc_compile(source: str, arch: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """(cubin, NVRTC's log: warnings, ptxas' with `options=("-Xptxas=-v",)`); for a virtual `arch`
    ("compute_75") the PTX instead, which the driver compiles for the card it loads on."""
    path = nvrtc_library()
    if path is None:
        raise RuntimeError("NVRTC not found (it comes with PyTorch's CUDA wheels or a CUDA toolkit)")
    nvrtc = ctypes.CDLL(path)
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"nf4_cuda.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [o.encode() for o in options]
        rc = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        log = log.value.decode(errors="replace")
        if rc != 0:
            raise RuntimeError(f"NVRTC ({path}) could not compile the NF4 kernels for {arch}: {log}")
        size = ctypes.c_size_t()
        what = "PTX" if arch.startswith("compute_") else "CUBIN"
        getattr(nvrtc, f"nvrtcGet{what}Size")(program, ctypes.byref(size))
        image = ctypes.create_string_buffer(size.value)
        if getattr(nvrtc, f"nvrtcGet{what}")(program, image) != 0:
            raise RuntimeError(f"nvrtcGet{what} failed")
        return image.raw, log
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def compiled(source: str, arch: str) -> tuple[bytes, str]:
    """`_nvrtc_compile(source, arch)`, kept on disk (`models.cache_dir()` / nvrtc) under a key of the source,
    the arch and NVRTC's version: a later process (each notebook, a new Colab session on the same disk) loads
    it instead of compiling again (4.5 s for sm_75 on 2 CPUs). From the disk the log is empty; where the cache
    cannot be written, it compiles each time."""
    from mistral_t4 import models

    key = hashlib.sha256(f"{arch}\0{nvrtc_version()}\0{source}".encode()).hexdigest()[:32]
    path = models.cache_dir() / "nvrtc" / f"nf4_cuda_{arch}_{key}.bin"
    try:
        return path.read_bytes(), ""
    except OSError:
        pass
    image, log = _nvrtc_compile(source, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_bytes(image)
        os.replace(partial, path)  # whole or absent: another process never reads half a file
    except OSError:
        pass
    return image, log


def nvrtc_version() -> str:
    """NVRTC's "major.minor" (the compiler of `compiled`'s images), "" without NVRTC."""
    path = nvrtc_library()
    if path is None:
        return ""
    major, minor = ctypes.c_int(), ctypes.c_int()
    ctypes.CDLL(path).nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


_LOCK = threading.Lock()


ARCH_ENV = "MISTRAL_T4_NF4_CUDA_ARCH"  # "compute_75": a T4's code and plans on a newer card (to check them there)


@functools.cache
def _module_cached(index: int, arch: str | None) -> _Module:
    device = torch.device("cuda", index)
    module = _Module(device, arch=arch)
    names = [kernel.name for kernel in KERNELS] + [kernel.name + "_swiglu" for kernel in KERNELS if kernel.swiglu]
    names += [kernel_name(*spec) for spec in norm_kernels()]
    for name in names + ["nf4_dequantize"]:  # now, not during a graph capture
        module.function(name)
    module.table_shared = table_shared_bytes(module)
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    module.ranges, module.shared = shared_plan(module.table_shared, optin, arch)
    return module


def arch_number(arch: str | None, default: int) -> int:
    """75 for "sm_75" / "compute_75", 90 for "sm_90a"; `default` (the card's own) for None."""
    return default if arch is None else int(arch.split("_")[1][:2])


def shared_plan(table_shared: int, optin: int, arch: str | None = None) -> tuple[bool, dict[str, int]]:
    """(whether CTAs cut K into ranges, dynamic shared memory per kernel) where the table takes `table_shared`
    bytes of a block's window (`table_shared_bytes`) and a block may have `optin`. Ranges where the table and
    every kernel's sums fit (sm80+: 127 KB, the sums below the table or after it); else the table alone,
    one K range per CTA: a T4's 64 KB (its window starts at 0), and code built for an arch before sm80 (PTX for
    compute_75 run on a newer card, `ARCH_ENV`) plans as a T4 would. `available` then checks the table fits at all (an L4's 99 KB does not)."""
    with_sums = {kernel.name: matmul_shared_bytes(table_shared, kernel.reduce_bytes) for kernel in KERNELS}
    if max(with_sums.values()) <= optin and arch_number(arch, 80) >= 80:
        return True, with_sums
    return False, {kernel.name: table_shared for kernel in KERNELS}


def matmul_shared_bytes(table_shared: int, reduce_bytes: int = REDUCE_BYTES) -> int:
    """Dynamic shared memory of the matmul kernels: the table's, and the K ranges' sums after it
    unless they fit in the window below it (they do on sm90: 63 KB). `reduce_bytes`: the sums'
    size, WARPS x groups per warp x column tiles x 512 (the package's kernels: REDUCE_BYTES)."""
    return table_shared + (0 if table_shared - 65536 >= reduce_bytes else reduce_bytes)


def table_shared_bytes(module: _Module) -> int:
    """Dynamic shared memory for nf4_matmul: from where the CTA's window starts to the end of a
    64 KB table on the next 64 KB boundary (the window starts at 1 KB on sm90: 127 KB)."""
    base = torch.zeros(1, dtype=torch.int32, device=torch.device("cuda", module.index))
    module.launch("smem_base", (1, 1), 32, [base], shared=16)
    start = int(base.item())
    return ((start + 0xFFFF) & ~0xFFFF) - start + 65536


def module(device: torch.device) -> _Module:
    """The compiled kernels for `device` (compiled on first use, a few seconds; then cached).

    The first call also launches a probe and waits for it (`table_shared_bytes`): make it
    outside a CUDA-graph capture (`available` does, at load)."""
    with _LOCK:
        return _module_cached(device.index if device.index is not None else torch.cuda.current_device(),
                              os.environ.get(ARCH_ENV) or None)


def cuts_ranges(device) -> bool:
    """Whether `nf4_matmul`'s CTAs cut K into ranges on `device` (`launch_plan`'s `ranges`): the compiled module's
    answer on a GPU (no on a T4); elsewhere (a description on the CPU) as on sm80+."""
    device = torch.device(device)
    return module(device).ranges if device.type == "cuda" else True


def available(device) -> bool:
    """Whether the kernels compile and load on `device` (sm75+ with NVRTC) and a block may hold their shared
    memory; never raises."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (7, 5):
        return False
    try:
        needed = max(module(device).shared.values())
    except Exception:  # no NVRTC, an NVRTC too old for the card, a driver error: the Triton kernel serves
        return False
    # sm86/sm89 (RTX 30/40, L4, A10) give a block at most 99 KB: the Triton kernel serves there
    return needed <= getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)


@functools.cache  # asked at every call of nf4_matmul (eager prefill: every projection of every chunk)
def launch_plan(m: int, n: int, k: int, sm_count: int, ranges: bool = True) -> tuple[Kernel, int, int, int]:
    """What `nf4_matmul` launches for x (m, k) and N = n: (kernel, row groups per CTA, split, K ranges);
    `ranges`: whether CTAs may cut K into ranges (the module's `ranges`: not on a T4)."""
    kernel = kernel_for(m, n, sm_count)
    return (kernel, *matmul_geometry(n, k, sm_count, ranges, groups_per_warp=kernel.groups, warps=kernel.warps))


def describe_plans(rows: int, shapes: dict[str, tuple[int, int]], sm_count: int,
                   swiglu: frozenset[str] = frozenset(), ranges: bool = True) -> dict[str, str]:
    """Per named weight (N, K): 'kernel (row groups per CTA, split, K ranges)' at `rows` rows, for the
    load log and the benchmark JSON, e.g. {"qkv": "nf4_matmul32w (4, 1, 8)", ...}; the names in `swiglu`
    (fused gate/up weights) as `nf4_matmul(..., swiglu=True)` launches them where it can, e.g.
    "nf4_matmul32w_swiglu (7, 1, 2)" (output groups per CTA)."""
    described = {}
    for name, (n, k) in shapes.items():
        kernel, tile, split, slices = launch_plan(rows, n, k, sm_count, ranges)
        label = kernel.name
        if name in swiglu and swiglu_supported(rows, n, sm_count):
            label, tile = label + "_swiglu", tile // 2
        described[name] = f"{label} ({tile}, {split}, {slices})"
    return described


def swiglu_supported(m: int, n: int, sm_count: int) -> bool:
    """Whether `nf4_matmul(..., swiglu=True)` takes x of m rows and a fused gate/up weight of n rows:
    whole 16-row groups in each half, and a kernel whose warps hold gate and up groups in pairs."""
    return 1 <= m <= MAX_ROWS and n % (2 * GROUP) == 0 and kernel_for(m, n, sm_count).swiglu


def nf4_matmul(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, code_fp16: torch.Tensor,
               tile_counters: torch.Tensor, out: torch.Tensor | None = None, split_k: int | None = None,
               early: bool = False, swiglu: bool = False, residual: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, sq: torch.Tensor | None = None, eps: float = 0.0):
    """x (M <= MAX_ROWS, K) fp16 @ W.T -> (M, N) fp16; W in the fragment layout; `code_fp16` the NF4
    table. The kernel of the fewest rows >= M (`kernel_for`).
    `early`: programmatic dependent launch (see `_Module.launch`; bench/experiments/nf4_pdl.py).
    `swiglu`: W is the fused gate/up weight (gate's rows, then up's): -> (M, N / 2) SiLU(gate) * up,
    computed by the matmul's epilogue from its fp16 outputs as eager PyTorch does (`swiglu_supported`).
    The RMSNorm after the residual add, split across two matmuls (`nf4.residual_norm_parts`, `nf4.rms_scales`):
      * `residual` (M, N) and `norm_weight` (N,): the product is the residual's delta: -> (residual + delta,
        that times norm_weight, its sums of squares per 16 columns (M, N / 16) fp32), each rounded as eager;
      * `sq` (M, K / 16) such sums of x's rows (x: such a product with the weight) and `eps`: each output row
        times 1 / sqrt(mean square + eps) (its RMSNorm, after the matmul) before it is rounded.
    Both in `_residual` / `_scaled` instances of the kernels, up to NORM_ROWS rows. With `residual` the kernel loads
    `residual` and `norm_weight` before it waits for the kernel before it (`early`): they must be older than that
    kernel (in a decoder layer they are: the residual stream, while that kernel gives x)."""
    m, k = x.shape
    n = fragments.shape[0]
    assert m <= MAX_ROWS and x.dtype == torch.float16 and supports(n, k, BLOCKSIZE)
    assert fragments.is_contiguous() and scales.is_contiguous() and fragments.shape[1] * 2 == k
    assert scales.dtype == torch.float16, "the fragment layout's scales are fp16 (`to_fragments`)"
    assert tile_counters.numel() >= n // GROUP, "one counter per tile: at most one per row group"
    outputs = n // 2 if swiglu else n
    if out is None:
        out = torch.empty((m, outputs), dtype=torch.float16, device=x.device)
    norm_args, norm_mode = [], None  # (resid, resid_out, xw_out, norm_w, sq, eps) of the `_residual` / `_scaled` kernels
    if residual is not None or sq is not None:
        assert m <= NORM_ROWS, f"the kernels carry the RMSNorm up to {NORM_ROWS} rows"
    if residual is not None:
        assert not swiglu and sq is None and residual.shape == (m, n) and residual.dtype == torch.float16
        assert norm_weight is not None and norm_weight.shape == (n,) and norm_weight.dtype == torch.float16
        residual, norm_weight = residual.contiguous(), norm_weight.contiguous()
        total, xw = torch.empty_like(residual), torch.empty_like(residual)
        sums = torch.empty((m, n // GROUP), dtype=torch.float32, device=x.device)
        norm_args, norm_mode, out = [residual, total, xw, norm_weight, sums, 0.0], "residual", (total, xw, sums)
    elif sq is not None:
        assert sq.shape == (m, k // GROUP) and sq.dtype == torch.float32
        norm_args, norm_mode = [out, out, out, out, sq.contiguous(), float(eps)], "scaled"
    if m == 0:  # the kernel reads row M - 1 for its padding rows
        return out
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # rows must allow 16-byte loads
        x = x.contiguous()
    from . import multiprocessor_count

    kernels = module(x.device)
    kernel, tile_groups, split, slices = launch_plan(m, n, k, multiprocessor_count(x.device), kernels.ranges)
    if split_k is not None and split_k != split:  # a split of the caller's: one K range per CTA
        tile_groups, split, slices = kernel.warps * kernel.groups, split_k, 1
    split_k = split
    if swiglu:  # the same warps and K ranges, each warp's groups half gate's, half up's: half the output groups
        assert swiglu_supported(m, n, multiprocessor_count(x.device)), "no SwiGLU kernel for this shape"
        tile_groups //= 2
    name = kernel_name(kernel, swiglu, norm_mode)
    target = norm_args[1] if norm_mode == "residual" else out  # (`out` itself is not written with `residual`)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else target
    grid = (-(-(outputs // GROUP) // tile_groups), split_k)
    kernels.launch(name, grid, 32 * kernel.warps, [x, fragments, scales, code_fp16, target, partial, tile_counters,
                                                   m, n, k, x.stride(0), target.stride(0), split_k, tile_groups, slices,
                                                   *norm_args],
                   shared=kernels.shared[kernel.name], early=early)
    return out


def nf4_dequantize(fragments: torch.Tensor, scales: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """(N, K) fp16 row-major, equal to `NF4Weight.dequantize(torch.float16)`; `code` is the fp32 table."""
    n, k = fragments.shape[0], fragments.shape[1] * 2
    assert scales.dtype == torch.float16, "the fragment layout's scales are fp16 (`to_fragments`)"
    out = torch.empty((n, k), dtype=torch.float16, device=fragments.device)
    chunks = (n // GROUP) * (k // BLOCKSIZE) * 32
    module(fragments.device).launch("nf4_dequantize", (-(-chunks // 256), 1), 256,
                                    [fragments, scales, code, out, n, k])
    return out
