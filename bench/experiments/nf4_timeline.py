"""Experiment: where a CUDA NF4 matmul's CTAs spend their time, from timestamps taken inside them.

    python bench/experiments/nf4_timeline.py [--constant-code]    # on an sm90 GPU; writes $OUT/nf4_timeline*.json

The package's kernels (`mistral_t4.kernels.nf4_cuda`), instantiated with `%globaltimer` stamps at the
template's phase boundaries (string-substituted, as nf4_interleave.py does; the arithmetic is the package's):
  0 entry, 1 table built (the ring's first loads are out), 2 `griddepcontrol.wait` returned,
  3 main loop done (per warp), 4 the K ranges' sums added, 5 results stored (thread 0 of each CTA), and the SM.
Each decode shape (qkv, o, gate_up with SwiGLU, down) at 1 and 32 rows with the package's geometry, launched
(a) alone and (b) as a layer's four matmuls back to back, each launched early as the engine does (programmatic
dependent launch), L2 flushed before. Per kernel: the span from the first CTA's entry to the last CTA's end,
the phases' mean / max per CTA, how far apart the CTAs start and end, and in (b) how long after the previous
kernel's last CTA ended each kernel's CTAs got past their wait.

Results (H200; nf4_timeline_h200_2026-11-27.json, nf4_timeline_constant_code_h200_2026-11-27.json):
  * alone, 1 row: o 6.1 us from the first CTA's entry to the last one's end (table 2.8, main loop 2.2, ranges'
    sums 0.6, store 0.2), qkv 8.5 (2.6 / 5.2), down 14.3 (3.1 / 9.9), gate_up 27.1 (2.8 / 22.4); CTAs start within
    0.3 us of each other and end within 0.3-2.3 us. 32 rows: o 10.0 (2.3 / 5.9 / 1.2 / 0.3), qkv 14.9 (1.9 /
    10.4 / 1.4), down 23.0 (2.5 / 18.2 / 1.1), gate_up 46.9 (2.0 / 39.0, and 3.0 for the SwiGLU store).
  * The 2-3 us before the main loop are the CTA's loads of the 16-entry NF4 code (every warp of every CTA reads
    the same 32 bytes) that the table waits for: with made-up values instead (`--constant-code`) that phase takes
    0.8 us, but the main loop takes as much longer (o 2.2 -> 3.6, down 9.9 -> 11.1) and the spans move by -1.0 to
    +0.5 us per kernel (a single run): the ring's first loads, sent before the table, are what the CTA waits for
    either way. At 1 row a kernel spends what its bytes take at ~4 TB/s plus ~2.5-4 us of first-load latency,
    ranges' sums and store.
  * The chain (b) is launched from Python outside a CUDA graph, so its kernels did not overlap (each started
    30-75 us after the previous one ended): those numbers say nothing about programmatic dependent launch.
"""
import ctypes
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EVENTS = 24  # per CTA: 0-5 as above, 6 the SM, 8 + w: warp w's main loop done
CTAS = 1024
SLOTS = 4


def source(constant_code=False):
    """`constant_code`: the table built from made-up values instead of loads of the NF4 code from global memory
    (wrong results; for timing the table phase only)."""
    from mistral_t4.kernels import nf4_cuda

    src = nf4_cuda.SOURCE
    body = src[src.index("template <int NT, int NG, int D, int WARPS, bool SWIGLU"):src.index("#define NF4_KERNEL")]
    if constant_code:
        load = "const u32 v = (u32)code[b & 15] | ((u32)code[b >> 4] << 16);"
        assert load in body
        body = body.replace(load, "const u32 v = (u32)(b & 15) * 0x1111u | ((u32)(b >> 4) << 16);")
    header = "template <int NT, int NG, int D, int WARPS, bool SWIGLU, bool SCALE_A = false, int NORM = NORM_NONE>"
    assert header in body
    body = body.replace(header, "template <int NT, int NG, int D, int WARPS, bool SWIGLU, bool SCALE_A, int SLOT, "
                                "int NORM = NORM_NONE>", 1)
    swaps = [
        ("nf4_matmul_body(", "nf4_timed_body("),
        ("    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;\n",
         "    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;\n"
         "    unsigned long long* stamps = nf4_times + ((size_t)SLOT * CTAS + blockIdx.y * gridDim.x + blockIdx.x) * EVENTS;\n"
         "    if (tid == 0) { stamps[0] = now(); stamps[6] = smid(); }\n"),
        ("    dependencies_wait();  // launched early",
         "    if (tid == 0) stamps[1] = now();\n    dependencies_wait();\n    if (tid == 0) stamps[2] = now();  //"),
        ("    dependents_launch();\n", "    if (lane == 0) stamps[8 + warp] = now();\n    dependents_launch();\n"),
        ("    nf4_matmul_store<NT, NG, WARPS, SWIGLU>(", "    __syncthreads();\n    if (tid == 0) stamps[4] = now();\n"
                                                        "    nf4_matmul_store<NT, NG, WARPS, SWIGLU>("),
    ]
    for old, new in swaps:
        assert old in body, old
        body = body.replace(old, new)
    body = body.rstrip()
    assert body.endswith("}")
    body = body[:-1] + "    __syncthreads();\n    if (tid == 0) stamps[5] = now();\n}\n"
    head = f"""
#define CTAS {CTAS}
#define EVENTS {EVENTS}
__device__ unsigned long long nf4_times[{SLOTS} * CTAS * EVENTS];
__device__ __forceinline__ unsigned long long now() {{
    unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }}
__device__ __forceinline__ unsigned long long smid() {{ unsigned s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); return s; }}
"""
    instances = ""
    for kernel in nf4_cuda.KERNELS:
        for swiglu in (False, True) if kernel.swiglu else (False,):
            for slot in range(SLOTS):
                name = f"timed_{kernel.name}{'_swiglu' if swiglu else ''}_{slot}"
                instances += (
                    f'extern "C" __global__ void __launch_bounds__({kernel.warps} * 32, 1) {name}(const u16* x, '
                    "const uint4* wq, const u32* scales, const u16* code, u16* out, float* partial, int* counters, "
                    "int M, int N, int K, int stride_xm, int stride_om, int split_k, int tile_groups, int slices) {\n"
                    f"    nf4_timed_body<{kernel.tiles}, {kernel.groups}, {kernel.ring}, {kernel.warps}, "
                    f"{str(swiglu).lower()}, {str(kernel.scale_a).lower()}, {slot}>(x, wq, scales, code, out, partial, "
                    "counters, M, N, K, stride_xm, stride_om, split_k, tile_groups, slices); }\n")
    return src + head + body + instances


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import MISTRAL_SHAPES, random_param, write_record

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_cuda

    dev = torch.device("cuda")
    sms = multiprocessor_count(dev)
    constant_code = "--constant-code" in sys.argv
    mod = nf4_cuda._Module(dev, source(constant_code))
    table_shared = nf4_cuda.table_shared_bytes(mod)
    pointer, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = mod.cuda.cuModuleGetGlobal_v2(ctypes.byref(pointer), ctypes.byref(size), mod.module, b"nf4_times")
    assert rc == 0, rc
    host = torch.zeros(size.value // 8, dtype=torch.int64)

    def read():
        torch.cuda.synchronize()
        assert mod.cuda.cuMemcpyDtoH_v2(ctypes.c_void_p(host.data_ptr()), pointer, size) == 0
        return host.view(SLOTS, CTAS, EVENTS).clone()

    def clear():
        torch.cuda.synchronize()
        assert mod.cuda.cuMemsetD8_v2(pointer, 0, size) == 0

    shapes = {name.split()[0]: (k, n) for name, k, n in MISTRAL_SHAPES
              if name.split()[0] in ("qkv", "q/o", "gate_up", "down")}
    order = [("qkv", False), ("q/o", False), ("gate_up", True), ("down", False)]
    weights = {name: NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda") for name, (k, n) in shapes.items()}
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=dev)

    def launch(name, swiglu, rows, slot, early, x):
        k, n = shapes[name]
        w = weights[name]
        kernel, tile, split, slices = nf4_cuda.launch_plan(rows, n, k, sms)
        outputs = n // 2 if swiglu else n
        if swiglu:
            tile //= 2
        out = torch.empty((rows, outputs), dtype=torch.float16, device=dev)
        partial = torch.empty((split, rows, n), dtype=torch.float32, device=dev) if split > 1 else out
        kname = f"timed_{kernel.name}{'_swiglu' if swiglu else ''}_{slot}"
        mod.launch(kname, (-(-(outputs // 16) // tile), split), 32 * kernel.warps,
                   [x, w.packed, w.absmax, w.code_fp16, out, partial, w.tile_counters, rows, n, k, x.stride(0),
                    out.stride(0), split, tile, slices],
                   shared=nf4_cuda.matmul_shared_bytes(table_shared, kernel.reduce_bytes), early=early)
        return (-(-(outputs // 16) // tile)) * split, kernel

    def summary(stamps, ctas, warps):
        s = stamps[:ctas].double()
        entry, table, waited, reduced, end = s[:, 0], s[:, 1], s[:, 2], s[:, 4], s[:, 5]
        loops = s[:, 8:8 + warps]
        loop_end = loops.max(1).values
        origin = entry.min()
        us = lambda t: round(float(t) / 1e3, 2)  # noqa: E731
        return dict(ctas=ctas, sms=int(s[:, 6].unique().numel()), span_us=us(end.max() - origin),
                    entry_spread_us=us(entry.max() - origin), end_spread_us=us(end.max() - end.min()),
                    table_us=us((table - entry).mean()), wait_us=us((waited - table).mean()),
                    wait_max_us=us((waited - table).max()),
                    loop_us=us((loop_end - waited).mean()), loop_max_us=us((loop_end - waited).max()),
                    loop_min_us=us((loop_end - waited).min()),
                    warp_loop_spread_us=us((loops.max(1).values - loops.min(1).values).mean()),
                    reduce_us=us((reduced - loop_end).mean()), store_us=us((end - reduced).mean()),
                    first_entry=float(origin), last_end=float(end.max()), first_waited=float(waited.min()),
                    last_waited=float(waited.max()))

    results = []
    for rows in (1, 32):
        xs = {k: torch.randn(rows, k, device=dev, dtype=torch.float16) for k in (4096, 14336)}
        # (a) alone
        for name, swiglu in order:
            k, _ = shapes[name]
            for _ in range(3):
                clear()
                torch.sum(flush)
                ctas, kernel = launch(name, swiglu, rows, 0, False, xs[k])
            stats = summary(read()[0], ctas, kernel.warps)
            results.append(dict(mode="alone", rows=rows, shape=name, kernel=kernel.name, **stats))
            print(f"alone {rows:2d} rows {name:8s} {kernel.name:14s} " + ", ".join(
                f"{key} {value}" for key, value in stats.items() if key.endswith("_us") or key in ("ctas", "sms")),
                flush=True)
        # (b) a layer's four back to back, launched early
        for _ in range(3):
            clear()
            torch.sum(flush)
            launched = [launch(name, swiglu, rows, slot, slot > 0, xs[shapes[name][0]])
                        for slot, (name, swiglu) in enumerate(order)]
        stamps = read()
        previous = None
        for slot, ((name, _), (ctas, kernel)) in enumerate(zip(order, launched)):
            stats = summary(stamps[slot], ctas, kernel.warps)
            if previous:
                stats["entry_after_previous_end_us"] = round((stats["first_entry"] - previous["last_end"]) / 1e3, 2)
                stats["waited_after_previous_end_us"] = round((stats["first_waited"] - previous["last_end"]) / 1e3, 2)
                stats["last_waited_after_previous_end_us"] = round((stats["last_waited"] - previous["last_end"]) / 1e3, 2)
            previous = stats
            results.append(dict(mode="chain", rows=rows, shape=name, kernel=kernel.name, **stats))
            print(f"chain {rows:2d} rows {name:8s} {kernel.name:14s} " + ", ".join(
                f"{key} {value}" for key, value in stats.items() if key.endswith("_us") or key in ("ctas", "sms")),
                flush=True)
    write_record("nf4_timeline_constant_code" if constant_code else "nf4_timeline", results=results)


if __name__ == "__main__":
    main()
