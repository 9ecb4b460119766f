"""Experiment (not used by the package): how fast `mma.sync.m16n8k16` and the table lookups run on this card.

    python bench/experiments/mma_rate.py      # on an sm80+ GPU; writes $OUT/mma_rate.json

Why: at 32 rows the decode step's NF4 matmuls are 3.5 ms per token on an H200 where the bytes
take ~1 ms. At 32 rows a 4 TB/s weight stream is 8e12 weights/s x 32 rows x 2 = 512 TFLOP/s of
MMA: whether `mma.sync` (the package's kernels) can give that much on Hopper decides whether the
32-row kernel needs wgmma. Each kernel here runs one thing in a loop with independent chains, on
every SM, at several warps per SM:
  * `mma_f32`: m16n8k16 fp16 x fp16 -> fp32 (the package's), `CH` independent accumulators per warp;
  * `mma_f16`: the same with fp16 accumulators (m16n8k16.f16.f16.f16.f16);
  * `lookup`: the package's table lookup, `prmt` + `ld.shared.u32` per 2 weights (32 copies, no conflicts).

Results (H200, mma_rate_h200_2026-11-27.json): m16n8k16 at 451-607 TFLOP/s with fp32 accumulators (4 -> 32
warps per SM; 8 chains per warp no better than 4) and the same with fp16 accumulators (no gain from them on
this card); the lookups at 14.4 / 16.2 / 16.3 T weights per s at 8 / 16 / 32 warps (8.2 TB/s of NF4: one
shared-memory wavefront per warp and clock, 64 weights). The package's 32-row kernels were far from both:
Nsight Compute put them at 24-33% tensor-pipe activity, ~30% issue slots, 2 warps per scheduler waiting on
loads and fixed latencies (bench/results/h200_2026-11-27_s10_scale_a/); so latency, not MMA throughput, and
the `scale_a` change that followed (independent MMA chains, fewer registers) took 5% off them.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

SOURCE = r"""
typedef unsigned int u32;
template <int CH>
__device__ __forceinline__ void mma_loop_f32(int iters, u32 a, u32 b, float* out) {
    float d[CH][4];
    #pragma unroll
    for (int c = 0; c < CH; c++) d[c][0] = d[c][1] = d[c][2] = d[c][3] = 0.f;
    for (int i = 0; i < iters; i++) {
        #pragma unroll
        for (int c = 0; c < CH; c++)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3]) : "r"(a), "r"(a + c), "r"(a), "r"(a), "r"(b), "r"(b));
    }
    float s = 0.f;
    #pragma unroll
    for (int c = 0; c < CH; c++) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
template <int CH>
__device__ __forceinline__ void mma_loop_f16(int iters, u32 a, u32 b, float* out) {
    u32 d[CH][2];
    #pragma unroll
    for (int c = 0; c < CH; c++) d[c][0] = d[c][1] = 0u;
    for (int i = 0; i < iters; i++) {
        #pragma unroll
        for (int c = 0; c < CH; c++)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%0,%1};"
                : "+r"(d[c][0]), "+r"(d[c][1]) : "r"(a), "r"(a + c), "r"(a), "r"(a), "r"(b), "r"(b));
    }
    u32 s = 0;
    #pragma unroll
    for (int c = 0; c < CH; c++) s ^= d[c][0] ^ d[c][1];
    out[blockIdx.x * blockDim.x + threadIdx.x] = (float)s;
}
extern "C" __global__ void mma_f32_4(int iters, u32 a, u32 b, float* out) { mma_loop_f32<4>(iters, a, b, out); }
extern "C" __global__ void mma_f32_8(int iters, u32 a, u32 b, float* out) { mma_loop_f32<8>(iters, a, b, out); }
extern "C" __global__ void mma_f16_4(int iters, u32 a, u32 b, float* out) { mma_loop_f16<4>(iters, a, b, out); }
extern "C" __global__ void mma_f16_8(int iters, u32 a, u32 b, float* out) { mma_loop_f16<8>(iters, a, b, out); }

// 16 lookups per iteration (4 words x 4 bytes), as the package's kernel per block and group
extern "C" __global__ void lookup(int iters, u32 a, u32 b, float* out) {
    extern __shared__ __align__(16) unsigned char window[];
    const u32 base = (u32)__cvta_generic_to_shared(window);
    const u32 table = (base + 0xFFFFu) & ~0xFFFFu;
    for (int i = threadIdx.x; i < 2048; i += blockDim.x) {
        const int r = i >> 3;
        asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};" :: "r"(table + r * 256 + (i & 7) * 16), "r"(r * 0x00010001u));
    }
    __syncthreads();
    const u32 lane_base = table | ((threadIdx.x & 31) << 2);
    u32 w0 = a * (threadIdx.x + 1), w1 = w0 * 7 + 3, w2 = w1 * 13 + 5, w3 = w2 * 3 + 1, acc = 0;
    for (int i = 0; i < iters; i++) {
        #pragma unroll
        for (int t = 0; t < 4; t++) {
            const u32 w = t == 0 ? w0 : t == 1 ? w1 : t == 2 ? w2 : w3;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                u32 addr, v;
                asm("prmt.b32 %0, %1, %2, %3;" : "=r"(addr) : "r"(w), "r"(lane_base), "r"(0x7604 | (j << 4)));
                asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
                acc += v;
            }
        }
        w0 += b; w1 ^= acc; w2 += 0x01010101u; w3 -= b;
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = (float)acc;
}
"""


def main():
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    from mistral_t4.kernels import nf4_cuda

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    module = nf4_cuda._Module(dev, SOURCE)
    table_shared = nf4_cuda.table_shared_bytes(nf4_cuda.module(dev))
    out = torch.empty(sms * 1024, device=dev)
    rows = []

    def timed(name, warps, iters, shared=0, blocks_per_sm=1):
        grid = (sms * blocks_per_sm, 1)
        args = [iters, 0x3C003C00, 0x3C003C00, out]
        module.launch(name, grid, 32 * warps, args, shared=shared)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = None
        for _ in range(5):
            start.record()
            module.launch(name, grid, 32 * warps, args, shared=shared)
            stop.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(stop)
            best = ms if best is None else min(best, ms)
        return best

    iters = 4096
    for name in ("mma_f32_4", "mma_f32_8", "mma_f16_4", "mma_f16_8"):
        chains = int(name.rsplit("_", 1)[1])
        for warps in (4, 8, 16, 32):
            if chains == 8 and warps == 32:  # 71 registers x 1024 threads: more than an SM has
                continue
            ms = timed(name, warps, iters)
            mmas = sms * warps * iters * chains
            tflops = mmas * 2 * 16 * 8 * 16 / (ms * 1e-3) / 1e12
            rows.append({"kernel": name, "warps_per_sm": warps, "ms": round(ms, 4), "tflops": round(tflops, 1)})
            print(f"{name:10s} warps/SM {warps:2d}: {ms:7.3f} ms  {tflops:7.1f} TFLOP/s", flush=True)
    for warps in (8, 16, 32):
        ms = timed("lookup", warps, iters, shared=table_shared)
        lookups = sms * warps * 32 * iters * 16
        weights = lookups * 2
        print(f"lookup     warps/SM {warps:2d}: {ms:7.3f} ms  {weights / (ms * 1e-3) / 1e12:6.2f} T weights/s "
              f"= {weights / 2 / (ms * 1e-3) / 1e12:6.2f} TB/s of NF4", flush=True)
        rows.append({"kernel": "lookup", "warps_per_sm": warps, "ms": round(ms, 4),
                     "tweights_per_s": round(weights / (ms * 1e-3) / 1e12, 2)})
    record = {"card": props.name, "torch": torch.__version__, "sms": sms, "results": rows}
    path = os.path.join(os.environ.get("OUT", "."), "mma_rate.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
