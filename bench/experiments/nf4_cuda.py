"""Experiment (not used by the package yet): an NF4 matmul in CUDA C++, compiled at run time by NVRTC.

    python bench/experiments/nf4_cuda.py      # on an sm80+ GPU; checks, then times; writes $OUT/nf4_cuda.json

Why: the Triton kernel's table lookup is 16 `prmt` + 6 logic ops per 8 weights, all on the
integer pipe (64 ops/clock/SM on sm80/sm90, half the fp32 rate): on an H200 that alone caps
it near 3 TB/s of NF4 before any other instruction, and the dequantized tile then goes
through shared memory to reach the tensor cores. Here instead:
  * a byte -> half2 table in shared memory: entry b holds (code[b & 15], code[b >> 4]) as
    fp16x2, 32 copies side by side (32 KB) so that lane l always reads bank l (no
    conflicts): per 2 weights 2 integer ops (address), 1 shared load, 1 fp16x2 scale multiply;
  * mma.sync m16n8k16 with the weights as operand A straight from those registers: the
    weights are repacked once ("fragment" layout, `repack`) so that each lane's 16 bytes of a
    64-weight block are one 128-bit load and each looked-up half2 is already an A register;
    K is permuted inside each block, identically for x, so that a lane's 16 values of x are
    contiguous too (the dot product does not care about the order of its terms);
  * split-K with per-tile counters, as the Triton kernel (last CTA sums in a fixed order and
    resets its counter); a 2-4 deep register ring of weight loads; NG groups of 16 weight
    rows per warp share x; MT = ceil(M / 8) column tiles of the MMA.
The launcher needs no CUDA toolkit: NVRTC (shipped with PyTorch's CUDA wheels) compiles the
source, the driver API (ctypes) loads and launches it on PyTorch's current stream (the
package's `mistral_t4.kernels.nf4_cuda._Module`, which grew out of this experiment).

Result (H200, torch 2.11 + CUDA 13 NVRTC; bench/experiments/nf4_cuda_h200_2026-11-26.json;
CUDA-graph replay with L2 flushed, best split/ring/NG per shape): correct (relative error
3.8e-4 against dequantize + fp32 matmul, as the Triton kernel; odd shapes, split-K, counters
back to zero), and per layer (qkv + o + gate_up + down), against the Triton kernel:
    M = 1:  76 us vs 108 us (1.41x; gate_up 1.91 TB/s of NF4, down 1.60)
    M = 8:  89 us vs 112 us (1.26x)
    M = 16: 116 us vs 116 us; M = 32: 157 vs 135; M = 64: 249 vs 170 (Triton wins)
From 16 rows up each warp reloads its x fragments from L1 for every 16 weight rows (MT x
32 bytes per lane per block): x traffic, not the weights, sets the pace. Next: stage x in
shared memory per CTA (or wgmma with x as operand B on sm90), then the kernel could serve
every decode batch; today it would only serve batch <= 8 (the chat), and it needs its own
copy of the weights in the fragment layout.
"""
import ctypes
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


SRC = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ u32 ld_u32(const u32* p) {
    u32 r; asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p)); return r;
}
__device__ __forceinline__ uint4 ld_x(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) { u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r; }
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 comp(uint4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float half_to_float(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 float_to_half(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

template <int MT, int D, int NG>
__device__ __forceinline__ void body(const u16* __restrict__ x, const uint4* __restrict__ wq, const u32* __restrict__ scales,
        const u16* __restrict__ code, u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ counters,
        int M, int N, int K, int stride_xm, int stride_om, int split_k) {
    __shared__ u32 lut[256 * 32];
    __shared__ int is_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    {
        #pragma unroll 4
        for (int r = 0; r < 16; r++) {  // rows b = 16 r + (tid >> 3): 8 threads per row, 4 words each
            const int b = 16 * r + (tid >> 3);
            const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);
            *(uint4*)(lut + b * 32 + (tid & 7) * 4) = make_uint4(v, v, v, v);
        }
    }
    __syncthreads();
    const int n_groups = (N + 15) >> 4;
    const int G0 = (blockIdx.x * 4 + warp) * NG;
    const int nb = K >> 6;
    const int per = (nb + split_k - 1) / split_k;
    const int kb0 = blockIdx.y * per;
    const int kb1 = min(kb0 + per, nb);
    const int g = lane >> 2, c = lane & 3;
    const char* lut_lane = (const char*)lut + (lane << 2);
    float acc[NG][MT][4];
    #pragma unroll
    for (int q = 0; q < NG; q++)
        #pragma unroll
        for (int mt = 0; mt < MT; mt++) { acc[q][mt][0] = acc[q][mt][1] = acc[q][mt][2] = acc[q][mt][3] = 0.f; }
    if (G0 < n_groups) {
        const uint4* wp[NG]; const u32* sp[NG];
        #pragma unroll
        for (int q = 0; q < NG; q++) {
            const int G = min(G0 + q, n_groups - 1);  // past the end: recompute the last group, never stored
            wp[q] = wq + (size_t)G * nb * 32 + lane;
            sp[q] = scales + (size_t)G * nb * 8 + g;
        }
        const u16* xrow[MT];
        bool xok[MT];
        #pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            int row = mt * 8 + g;
            xok[mt] = row < M;
            xrow[mt] = x + (size_t)(xok[mt] ? row : 0) * stride_xm + c * 16;
        }
        uint4 wr[D][NG]; u32 sr[D][NG];
        #pragma unroll
        for (int d = 0; d < D; d++) {
            int b = kb0 + d;
            if (b < kb1) {
                #pragma unroll
                for (int q = 0; q < NG; q++) { wr[d][q] = ld_stream(wp[q] + (size_t)b * 32); sr[d][q] = ld_u32(sp[q] + (size_t)b * 8); }
            }
        }
        for (int b0 = kb0; b0 < kb1; b0 += D) {
            #pragma unroll
            for (int d = 0; d < D; d++) {
                const int b = b0 + d;
                if (b < kb1) {
                    uint4 wv[NG]; u32 sv[NG];
                    #pragma unroll
                    for (int q = 0; q < NG; q++) { wv[q] = wr[d][q]; sv[q] = sr[d][q]; }
                    const int bn = b + D;
                    if (bn < kb1) {
                        #pragma unroll
                        for (int q = 0; q < NG; q++) { wr[d][q] = ld_stream(wp[q] + (size_t)bn * 32); sr[d][q] = ld_u32(sp[q] + (size_t)bn * 8); }
                    }
                    uint4 xv[MT][2];
                    #pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        if (xok[mt]) {
                            const uint4* xp = (const uint4*)(xrow[mt] + b * 64);
                            xv[mt][0] = ld_x(xp); xv[mt][1] = ld_x(xp + 1);
                        } else {
                            xv[mt][0] = make_uint4(0, 0, 0, 0); xv[mt][1] = make_uint4(0, 0, 0, 0);
                        }
                    }
                    #pragma unroll
                    for (int q = 0; q < NG; q++) {
                    const u32 s_g = prmt(sv[q], sv[q], 0x1010), s_g8 = prmt(sv[q], sv[q], 0x3232);
                    #pragma unroll
                    for (int t = 0; t < 4; t++) {
                        const u32 word = comp(wv[q], t);
                        u32 a0 = *(const u32*)(lut_lane + ((word << 7) & 0x7F80));
                        u32 a1 = *(const u32*)(lut_lane + ((word >> 1) & 0x7F80));
                        u32 a2 = *(const u32*)(lut_lane + ((word >> 9) & 0x7F80));
                        u32 a3 = *(const u32*)(lut_lane + ((word >> 17) & 0x7F80));
                        a0 = hmul2(a0, s_g); a1 = hmul2(a1, s_g8); a2 = hmul2(a2, s_g); a3 = hmul2(a3, s_g8);
                        #pragma unroll
                        for (int mt = 0; mt < MT; mt++)
                            mma(acc[q][mt], a0, a1, a2, a3, comp(xv[mt][t >> 1], (2 * t) & 3), comp(xv[mt][t >> 1], (2 * t + 1) & 3));
                    }
                    }
                }
            }
        }
    }
    // out[m = 8 mt + 2c + e, n = 16 G + g + 8 h] = acc[mt][2 h + e]
    if (split_k == 1) {
        #pragma unroll
        for (int q = 0; q < NG; q++) {
            const int G = G0 + q;
            if (G >= n_groups) break;
            #pragma unroll
            for (int mt = 0; mt < MT; mt++)
                #pragma unroll
                for (int h = 0; h < 2; h++)
                    #pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int m = mt * 8 + 2 * c + e, n = G * 16 + g + 8 * h;
                        if (m < M && n < N) out[(size_t)m * stride_om + n] = float_to_half(acc[q][mt][2 * h + e]);
                    }
        }
        return;
    }
    #pragma unroll
    for (int q = 0; q < NG; q++) {
        const int G = G0 + q;
        if (G >= n_groups) break;
        #pragma unroll
        for (int mt = 0; mt < MT; mt++)
            #pragma unroll
            for (int h = 0; h < 2; h++)
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    int m = mt * 8 + 2 * c + e, n = G * 16 + g + 8 * h;
                    if (m < M && n < N) partial[((size_t)blockIdx.y * M + m) * N + n] = acc[q][mt][2 * h + e];
                }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(counters + blockIdx.x, 1) == split_k - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int q = 0; q < NG; q++) {
        const int G = G0 + q;
        if (G >= n_groups) break;
        for (int mt = 0; mt < MT; mt++)
            for (int h = 0; h < 2; h++)
                for (int e = 0; e < 2; e++) {
                    int m = mt * 8 + 2 * c + e, n = G * 16 + g + 8 * h;
                    if (m < M && n < N) {
                        float total = 0.f;
                        for (int sk = 0; sk < split_k; sk++) {
                            const float* p = partial + ((size_t)sk * M + m) * N + n;
                            float v; asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
                            total += v;
                        }
                        out[(size_t)m * stride_om + n] = float_to_half(total);
                    }
                }
    }
    if (tid == 0) counters[blockIdx.x] = 0;
}

#define KERNEL(MT, D, NG) \
extern "C" __global__ void __launch_bounds__(128) nf4_mma_##MT##_##D##_##NG(const u16* x, const uint4* wq, const u32* scales, \
        const u16* code, u16* out, float* partial, int* counters, int M, int N, int K, int stride_xm, int stride_om, int split_k) { \
    body<MT, D, NG>(x, wq, scales, code, out, partial, counters, M, N, K, stride_xm, stride_om, split_k); }
KERNEL(1, 4, 1) KERNEL(1, 2, 2) KERNEL(1, 4, 2) KERNEL(2, 4, 1) KERNEL(2, 2, 2) KERNEL(2, 4, 2) KERNEL(2, 2, 4)
KERNEL(4, 2, 1) KERNEL(4, 2, 2) KERNEL(4, 2, 4) KERNEL(8, 2, 1) KERNEL(8, 2, 2) KERNEL(8, 1, 4) KERNEL(4, 1, 4)
"""


def Module(src=SRC, arch=None):
    """The package's NVRTC compile + driver-API launcher (`mistral_t4.kernels.nf4_cuda._Module`) over `src`."""
    from mistral_t4.kernels import nf4_cuda

    return nf4_cuda._Module(torch.device("cuda"), src, arch)


def registers(mod, name):
    count = ctypes.c_int()
    mod.cuda.cuFuncGetAttribute(ctypes.byref(count), 4, mod.function(name))  # CU_FUNC_ATTRIBUTE_NUM_REGS
    return count.value


def repack(q_idx, absmax, out_features):
    """q_idx (N, K) uint8 4-bit indices, absmax (N, K/64) fp32 -> (fragments uint8, scales int32 (G, nb, 8))."""
    n, k = q_idx.shape
    nb = k // 64
    pad = (-n) % 16
    if pad:
        q_idx = torch.cat([q_idx, q_idx.new_full((pad, k), 7)])
        absmax = torch.cat([absmax, absmax.new_zeros((pad, nb))])
    G = q_idx.shape[0] // 16
    q = q_idx.view(G, 2, 8, nb, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 6, 1, 7)  # (G, nb, g, c, t, h, rh, e)
    packed = (q[..., 0] | (q[..., 1] << 4)).contiguous().view(-1)
    s = absmax.half().view(G, 2, 8, nb).permute(0, 3, 2, 1).contiguous()  # (G, nb, g, rh)
    return packed, s.view(torch.int32).view(G, nb, 8)


def indices_from_bnb_order(packed_bnb, n, k):
    p = packed_bnb.view(n, k // 2)
    return torch.stack([p >> 4, p & 15], dim=-1).view(n, k)


def matmul(mod, x, packed, scales, code16, counters, n, split_k, D=4, NG=1, out=None):
    m, k = x.shape
    assert x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    if out is None:
        out = torch.empty((m, n), dtype=torch.float16, device=x.device)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    groups = (n + 15) // 16
    grid = ((groups + 4 * NG - 1) // (4 * NG), split_k)
    mod.launch(f"nf4_mma_{mt}_{D}_{NG}", grid, 128, [x, packed, scales, code16, out, partial, counters, m, n, k, x.stride(0), out.stride(0), split_k])
    return out


# (ring depth D, weight groups per warp NG) compiled for each MT (column tiles of 8 rows)
VARIANTS = {
    1: [(4, 1), (2, 2), (4, 2)],
    2: [(4, 1), (2, 2), (4, 2), (2, 4)],
    4: [(2, 1), (2, 2), (2, 4), (1, 4)],
    8: [(2, 1), (2, 2), (1, 4)],
}


def column_tiles(m):
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def fragments_of(w, n, k):
    """The Triton backend's NF4Weight -> (fragment bytes, scale pairs) for this kernel."""
    from mistral_t4.kernels import nf4_triton

    q = indices_from_bnb_order(nf4_triton.from_halves(w.packed, w.blocksize, k), n, k)
    return repack(q, w.absmax, n)


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, random_param, rel_error, timer

    from mistral_t4.kernels import NF4Weight, nf4_triton

    from mistral_t4.kernels.nf4_cuda import nvrtc_library

    start = time.time()
    mod = Module()
    print(f"NVRTC {nvrtc_library()}: compiled in {time.time() - start:.1f} s", flush=True)
    for mt, variants in VARIANTS.items():
        print(f"MT={mt} registers:", [(v, registers(mod, f"nf4_mma_{mt}_{v[0]}_{v[1]}")) for v in variants], flush=True)
    dev = torch.device("cuda")
    time_ms = timer(dev)
    failures = 0
    for n, k in [(96, 320), (40, 192), (1000, 4096), (4096, 14336)]:  # odd shapes, every variant and split
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="triton")
        packed, scales = fragments_of(w, n, k)
        code16 = w.code_fp16.view(torch.int16)
        w_fp32 = w.dequantize(torch.float32)
        for m in (1, 3, 8, 13, 32, 50, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ w_fp32.T
            for split_k in (1, 3, 8):
                for depth, groups in VARIANTS[column_tiles(m)]:
                    out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                    matmul(mod, x, packed, scales, code16, w.tile_counters, n, split_k, D=depth, NG=groups, out=out)
                    torch.cuda.synchronize()
                    err, counters = rel_error(out, ref), int(w.tile_counters.abs().sum())
                    if not (err < 2e-3 and counters == 0):
                        failures += 1
                        print(f"WRONG n={n} k={k} m={m} split={split_k} D={depth} NG={groups}: {err} {counters}")
        print(f"checked N={n} K={k}", flush=True)
    results, per_layer = [], {}
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="triton")
        packed, scales = fragments_of(w, n, k)
        code16 = w.code_fp16.view(torch.int16)
        w_fp32 = w.dequantize(torch.float32)
        for m in (1, 8, 16, 32, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ w_fp32.T
            triton_ms = time_ms(lambda: nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64))
            rows = []
            for split_k in (1, 2, 4, 8, 16):
                for depth, groups in VARIANTS[column_tiles(m)]:
                    def fn():
                        return matmul(mod, x, packed, scales, code16, w.tile_counters, n, split_k, D=depth, NG=groups)

                    err = rel_error(fn(), ref)
                    rows.append(dict(ms=time_ms(fn), split_k=split_k, D=depth, NG=groups, err=err))
            rows.sort(key=lambda r: r["ms"])
            best = rows[0]
            totals = per_layer.setdefault(m, [0.0, 0.0])
            totals[0] += triton_ms
            totals[1] += best["ms"]
            print(f"{name} M={m}: triton {triton_ms * 1e3:.1f} us, cuda {best['ms'] * 1e3:.1f} us "
                  f"(split {best['split_k']} D {best['D']} NG {best['NG']}, err {best['err']:.1e}, "
                  f"{w.nbytes / best['ms'] / 1e6:.0f} GB/s)", flush=True)
            results.append(dict(shape=name, m=m, triton_ms=triton_ms, cuda=rows))
    for m, (triton_total, cuda_total) in per_layer.items():
        print(f"per layer M={m}: triton {triton_total * 1e3:.1f} us, cuda {cuda_total * 1e3:.1f} us, "
              f"x{triton_total / cuda_total:.2f}", flush=True)
    if os.environ.get("OUT"):
        system = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, nvrtc=nvrtc_library(),
                      date=time.strftime("%Y-%m-%d"))
        with open(os.path.join(os.environ["OUT"], "nf4_cuda.json"), "w") as f:
            json.dump(dict(system=system, failures=failures, results=results), f, indent=1)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
