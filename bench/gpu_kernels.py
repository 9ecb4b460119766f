"""Correctness and speed of the kernels on a GPU: `python bench/gpu_kernels.py [--sweep] [--smoke]`.

NF4 linear, for every Mistral-7B projection shape and M in {1, 8, 32, 64, 128, 4096} rows:
relative error ||out - ref|| / ||ref|| against an fp32 reference (dequantize + fp32
matmul), GPU time, and achieved GB/s against the bytes the kernel must move (NF4 data +
scales + x + out), for the Triton backend and the CUDA one (its kernels up to 32 rows, its
dequantize + cuBLAS above; its dequantize must equal bitsandbytes' from its fp16 scales bit for bit). Beside
them: bitsandbytes' kernel (the sm75 backend), dequantize + cuBLAS, and fp16 cuBLAS on a
dense weight (4x the bytes: the baseline to beat).
Decode attention at batch 1, 32, 64 with full caches of 256 and 4096 positions; beside it the
decode step's fused rotary + cache write + attention against the three steps it replaces.
The gate/up projection with SiLU(gate) * up in the CUDA kernel's epilogue (`nf4_swiglu`) against
the matmul then `silu_mul`, at 1-64 rows and with split-K (the partials' path): error against fp32,
how many outputs differ from the two-step fp16 result, and time. The residual add + RMSNorm kernel
against eager PyTorch and inductor's fused kernel. The same norm carried by the CUDA NF4 kernels'
epilogues (`norm_fold`) against PyTorch around the plain kernel and against eager RMSNorm then the matmul.
A decode step's NF4 matmuls (8 layers of the 4 fused projections, 1 GB, one CUDA graph).
Then: torch.compile(fullgraph=True, mode="reduce-overhead") captures both custom ops in
one CUDA graph and matches eager; split-K gives bit-identical results call after call.

Timing: each call is replayed from a CUDA graph (no Python launch overhead, as in the
engine's compiled decode step) after reading a 256 MB buffer, so weights come from DRAM
as they do in a decode step (4 GB of weights through a 50 MB L2); the time of the flush
alone is subtracted.

--sweep times a grid of tile configurations per decode shape (to tune the defaults).
--smoke runs tiny shapes (on CPU under TRITON_INTERPRET=1, to check this script).
Prints tables; the last line of stdout is one JSON document, also written to
$OUT/gpu_kernels.json when OUT is set.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import time
import traceback

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
import triton

from mistral_t4.kernels import NF4Weight, decode_attention, decode_attention_reference, nf4_linear
from mistral_t4.kernels.nf4 import nf4_swiglu, silu_mul
from mistral_t4.kernels.attention import decode_attention_rotary, decode_attention_rotary_reference, rotate
from mistral_t4.kernels import attention_triton, multiprocessor_count, nf4_cuda, nf4_triton

# (name, in_features, out_features) of Mistral-7B's projections, fused ones included.
MISTRAL_SHAPES = [
    ("q/o 4096->4096", 4096, 4096),
    ("k/v 4096->1024", 4096, 1024),
    ("qkv 4096->6144", 4096, 6144),
    ("gate/up 4096->14336", 4096, 14336),
    ("gate_up 4096->28672", 4096, 28672),
    ("down 14336->4096", 14336, 4096),
]
SMOKE_SHAPES = [("smoke 256->96", 256, 96), ("smoke 320->40", 320, 40)]
DECODE_SHAPES = ["qkv 4096->6144", "q/o 4096->4096", "gate_up 4096->28672", "down 14336->4096"]


def timer(device):
    """GPU milliseconds of one fn() call, weights cold in L2; wall clock on CPU (smoke runs)."""
    if device.type != "cuda":

        def wall(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return wall
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)
    scratch = torch.empty((), device=device)

    def graph_ms(fn, calls):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                torch.sum(flush, 0, out=scratch)  # reads evict the L2 without leaving dirty lines
                if fn is not None:
                    fn()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def gpu_ms(fn, calls=20):
        fn()  # compile and warm up outside the graph
        torch.cuda.synchronize()
        return (graph_ms(fn, calls) - graph_ms(None, calls)) / calls

    return gpu_ms


def rel_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_matmul(out, ref, counters, label):
    """For the experiments: 0 if `out` matches `ref` (relative error < 1e-3) and every split-K
    counter is back to zero, else 1 and a WRONG line."""
    torch.cuda.synchronize()
    err, left = rel_error(out, ref), int(counters.abs().sum())
    if err < 1e-3 and left == 0:
        return 0
    print(f"WRONG {label}: {err} {left}", flush=True)
    return 1


def write_record(name, **payload):
    """For the experiments: $OUT/<name>.json (when OUT is set) with the card, torch version and date."""
    if os.environ.get("OUT"):
        system = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        with open(os.path.join(os.environ["OUT"], f"{name}.json"), "w") as f:
            json.dump(dict(system=system, **payload), f, indent=1)


def random_param(in_features, out_features, device):
    """A bitsandbytes NF4 weight (double quantization) of random fp16 values."""
    w = torch.randn(out_features, in_features, dtype=torch.float16) * 0.02
    return bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4").to(device)


def fmt(r):
    if "error" in r:
        return f"ERROR {r['error'][:80]}"
    return f"{r['ms'] * 1e3:8.1f} us {r['gbps']:6.0f} GB/s" + (f" err {r['rel_err']:.1e}" if "rel_err" in r else "")


def bench_nf4(shapes, rows, device, dtype, time_ms):
    results = []
    for name, k, n in shapes:
        param = random_param(k, n, device)
        w = NF4Weight.from_bnb(param, backend="triton")
        w_bnb = NF4Weight.from_bnb(param, backend="bnb")
        w_cuda = NF4Weight.from_bnb(param, backend="cuda") if device.type == "cuda" else None
        w_fp32 = w.dequantize(torch.float32)
        w_dense = w.dequantize(dtype)
        if w_cuda is not None:
            # (its scales are fp16: the reference is its own dequantize, bitsandbytes' from those scales)
            exact = torch.equal(nf4_cuda.nf4_dequantize(w_cuda.packed, w_cuda.absmax, w_cuda.code), w_cuda.dequantize(dtype))
            results.append(dict(shape=name, cuda_dequantize_exact=exact))
            print(f"{name:<22} CUDA dequantize equals the reference: {exact}", flush=True)
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = x.float() @ w_fp32.T
            io_bytes = x.nbytes + m * n * x.element_size()
            row = dict(shape=name, m=m, n=n, k=k)
            def dequant_cublas():
                return F.linear(x, nf4_triton.nf4_dequantize(w.packed, w.absmax, w.code, 64, k, dtype))

            candidates = {
                "triton": (lambda: nf4_linear(x, w), w.nbytes),
                "cuda": (lambda: nf4_linear(x, w_cuda), w.nbytes),
                "bnb": (lambda: nf4_linear(x, w_bnb), w.nbytes),
                "dequant+cublas": (dequant_cublas, w.nbytes),
                "fp16 cublas": (lambda: F.linear(x, w_dense), w_dense.nbytes),
            }
            for label, (fn, weight_bytes) in candidates.items():
                if device.type != "cuda" and label in ("bnb", "fp16 cublas", "cuda"):
                    continue
                try:
                    err = rel_error(fn(), ref)
                    ms = time_ms(fn)
                    row[label] = dict(ms=ms, gbps=(weight_bytes + io_bytes) / ms / 1e6, rel_err=err)
                except Exception as e:  # keep going: one failure must not hide the other numbers
                    row[label] = dict(error=f"{type(e).__name__}: {e}")
            results.append(row)
            labels = [lb for lb in candidates if lb in row]
            print(f"{name:<22} M={m:<5}" + "".join(f" | {lb}: {fmt(row[lb])}" for lb in labels), flush=True)
    return results


def bench_swiglu(device, dtype, time_ms, smoke):
    """SiLU(gate) * up in the matmul's epilogue (`nf4_swiglu`, "cuda" backend) against the two steps."""
    shapes = [("smoke 256->2x96", 256, 192)] if smoke else [("gate_up 4096->28672", 4096, 28672), ("odd 576->2x208", 576, 416)]
    results = []
    for name, k, n in shapes:
        w = NF4Weight.from_bnb(random_param(k, n, device), backend="cuda")
        w_fp32 = w.dequantize(torch.float32)
        for m, split in [(1, None), (5, None), (8, None), (13, None), (16, None), (24, None), (32, None), (40, None),
                         (64, None), (8, 4), (32, 3), (64, 2)]:
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = silu_mul(x.float() @ w_fp32.T)
            steps = silu_mul(nf4_linear(x, w))
            if split is None:
                fused = nf4_swiglu(x, w)
            elif not nf4_cuda.swiglu_supported(m, n, multiprocessor_count(device)):
                continue  # the kernel for these rows has no SwiGLU instance (nf4_swiglu takes the two steps)
            else:  # a forced split: the last CTA of each tile applies the epilogue to the summed halves
                fused = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, split_k=split, swiglu=True)
            torch.cuda.synchronize()
            row = dict(shape=name, m=m, split_k=split, rel_err=rel_error(fused, ref), steps_rel_err=rel_error(steps, ref),
                       differ_from_steps=int((fused != steps).sum()), outputs=fused.numel(),
                       max_abs_diff=(fused.float() - steps.float()).abs().max().item(),
                       counters_zero=int(w.tile_counters.abs().sum()) == 0)
            if split is None:
                row["fused_ms"] = time_ms(lambda: nf4_swiglu(x, w))
                row["steps_ms"] = time_ms(lambda: silu_mul(nf4_linear(x, w)))
            results.append(row)
            print(f"{name:<22} M={m:<3} split {split}: err {row['rel_err']:.1e} (steps {row['steps_rel_err']:.1e}), "
                  f"{row['differ_from_steps']}/{row['outputs']} differ from the steps (max {row['max_abs_diff']:.1e})"
                  + (f", {row['fused_ms'] * 1e3:.1f} vs {row['steps_ms'] * 1e3:.1f} us" if split is None else ""), flush=True)
    return results


def bench_norm(device, dtype, time_ms):
    """The residual add + RMSNorm kernel (`add_rms_norm_fused`) against the reference, eager and compiled."""
    from mistral_t4.kernels.norm import add_rms_norm, add_rms_norm_fused

    compiled = torch.compile(add_rms_norm, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})
    results = []
    for rows in (1, 32, 64):
        x, delta = (torch.randn(rows, 4096, device=device, dtype=dtype) for _ in range(2))
        weight = (1 + 0.1 * torch.randn(4096, device=device)).to(dtype)
        total, h = add_rms_norm_fused(x, delta, weight, 1e-5)
        ref_total, ref_h = add_rms_norm(x, delta, weight, 1e-5)
        ind_total, ind_h = compiled(x, delta, weight, 1e-5)
        row = dict(rows=rows, sum_equal=torch.equal(total, ref_total), h_differ=int((h != ref_h).sum()),
                   inductor_h_differ=int((ind_h != ref_h).sum()), h_max_abs_diff=(h.float() - ref_h.float()).abs().max().item(),
                   fused_ms=time_ms(lambda: add_rms_norm_fused(x, delta, weight, 1e-5)),
                   inductor_ms=time_ms(lambda: compiled(x, delta, weight, 1e-5)))
        results.append(row)
        print(f"add_rms_norm rows={rows}: sum equal {row['sum_equal']}, h differs from eager in {row['h_differ']} "
              f"(inductor's: {row['inductor_h_differ']}) of {h.numel()}, max {row['h_max_abs_diff']:.1e}; "
              f"{row['fused_ms'] * 1e3:.1f} vs inductor {row['inductor_ms'] * 1e3:.1f} us", flush=True)
    return results


def bench_norm_fold(device, dtype, time_ms):
    """The RMSNorm carried by the CUDA NF4 kernels' epilogues (`nf4_cuda.nf4_matmul(residual=, norm_weight=)` for o
    and down, `(sq=, eps=)` for qkv and gate/up after them) against the same in PyTorch around the plain kernel
    (`norm.residual_norm_parts`, `rms_scales`: the sum and its product with the weight must be equal bit for bit, the
    sums of squares to fp32 rounding) and against eager RMSNorm then the matmul (what the decode step did: error
    in fp32 terms), at 1-16 rows (`nf4_cuda.NORM_ROWS`) and with split-K (the last CTA's path); the time of one
    matmul with and without."""
    from mistral_t4.kernels.norm import add_rms_norm, norm_parts, residual_norm_parts, rms_scales

    eps = 1e-5
    results = []
    for name, k, n, swiglu in [("o 4096->4096", 4096, 4096, False), ("down 14336->4096", 14336, 4096, False),
                               ("qkv 4096->6144", 4096, 6144, False), ("gate_up 4096->28672", 4096, 28672, True),
                               ("odd 576->208", 576, 208, False), ("odd 576->2x208", 576, 416, True)]:
        w = NF4Weight.from_bnb(random_param(k, n, device), backend="cuda")
        w_fp32 = w.dequantize(torch.float32)
        norm_w = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)  # the next norm's weight (over x's columns)
        for m, split in [(1, None), (5, None), (8, None), (13, None), (16, None), (8, 3), (16, 2)]:
            row = dict(shape=name, m=m, split_k=split)
            if not swiglu:  # producer: x (m, k) @ W.T is the delta of a residual (m, n)
                x = torch.randn(m, k, device=device, dtype=dtype)
                resid = torch.randn(m, n, device=device, dtype=dtype)
                nw = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
                total, xw, sums = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, split_k=split,
                                                      residual=resid, norm_weight=nw)
                plain = nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, split_k=split)
                ref_total, ref_xw, ref_sums = residual_norm_parts(resid, plain, nw)
                torch.cuda.synchronize()
                row.update(residual_equal=torch.equal(total, ref_total), xw_equal=torch.equal(xw, ref_xw),
                           sums_rel_err=rel_error(sums, ref_sums.float()),
                           counters_zero=int(w.tile_counters.abs().sum()) == 0)
                if split is None:
                    row["residual_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(
                        x, w.packed, w.absmax, w.code_fp16, w.tile_counters, residual=resid, norm_weight=nw))
                    row["plain_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(x, w.packed, w.absmax, w.code_fp16,
                                                                           w.tile_counters))
            # consumer: the norm of a residual s over k columns, applied after the matmul
            s = torch.randn(m, k, device=device, dtype=dtype)
            s_xw, s_sums = norm_parts(s, norm_w)
            out = nf4_cuda.nf4_matmul(s_xw, w.packed, w.absmax, w.code_fp16, w.tile_counters, split_k=split,
                                      swiglu=swiglu and split is None, sq=s_sums, eps=eps)
            exact = (s_xw.float() @ w_fp32.T) * rms_scales(s_sums, eps)  # the same algebra in fp32
            eager = add_rms_norm(torch.zeros_like(s), s, norm_w, eps)[1].float() @ w_fp32.T  # the step's norm, then W
            if swiglu and split is None:
                exact, eager = silu_mul(exact), silu_mul(eager)
            torch.cuda.synchronize()
            row.update(scaled_rel_err=rel_error(out, exact), scaled_vs_eager_norm=rel_error(out, eager),
                       scaled_counters_zero=int(w.tile_counters.abs().sum()) == 0)
            if split is None:
                row["scaled_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(s_xw, w.packed, w.absmax, w.code_fp16,
                                                                        w.tile_counters, swiglu=swiglu, sq=s_sums, eps=eps))
                row["unscaled_ms"] = time_ms(lambda: nf4_cuda.nf4_matmul(s_xw, w.packed, w.absmax, w.code_fp16,
                                                                          w.tile_counters, swiglu=swiglu))
            results.append(row)
            print("norm_fold " + " ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                                          for key, value in row.items()), flush=True)
    return results


def sweep_configs(m, n, k, sm_count):
    """Configurations around matmul_config's choice: tile rows, stages, warps, split-K x0.5/x1/x2."""
    default = nf4_triton.matmul_config(m, n, k, 64, sm_count)
    for block_n in (64, 128):
        for num_stages in (3, 4):
            for num_warps in (4, 8):
                for split_k in sorted({max(1, default["SPLIT_K"] // 2), default["SPLIT_K"], default["SPLIT_K"] * 2}):
                    yield {**default, "BLOCK_N": block_n, "num_stages": num_stages, "SPLIT_K": split_k, "num_warps": num_warps}


def _compile_one(args):
    """Run one configuration once on small tensors (same specialization), filling Triton's disk cache."""
    m, config = args
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    param = random_param(1024, 512, "cuda")
    w = NF4Weight.from_bnb(param, backend="triton")
    try:
        nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64, config=config)
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{config}: {type(e).__name__}: {str(e)[:200]}"


def precompile(jobs):
    """Compile (rows, config) pairs, duplicates dropped, in parallel processes (compiling dominates a sweep)."""
    jobs = [(m, dict(c)) for m, c in sorted({(m, tuple(sorted(config.items()))) for m, config in jobs})]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=12, mp_context=context) as pool:
        errors = [e for e in pool.map(_compile_one, jobs) if e]
    first = f": {errors[0]}" if errors else ""
    print(f"precompiled {len(jobs)} configurations, {len(errors)} failed{first}", flush=True)


def sweep_nf4(shapes, rows, device, dtype, time_ms, deadline):
    """Time a grid of configurations per shape and M (until `deadline`); print the best few."""
    sm_count = multiprocessor_count(device)
    if device.type == "cuda":
        precompile((m, c) for _, k, n in shapes for m in rows for c in sweep_configs(m, n, k, sm_count))
    results = []
    for name, k, n in shapes:
        w = NF4Weight.from_bnb(random_param(k, n, device), backend="triton")
        w_fp32 = w.dequantize(torch.float32)
        for m in rows:
            if time.monotonic() > deadline:
                print(f"sweep: out of time before {name} M={m}", flush=True)
                return results
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = x.float() @ w_fp32.T
            bytes_moved = w.nbytes + x.nbytes + m * n * x.element_size()
            timings = []
            for config in sweep_configs(m, n, k, sm_count):
                fn = lambda: nf4_triton.nf4_matmul(  # noqa: E731
                    x, w.packed, w.absmax, w.lookup_table(dtype), w.tile_counters, 64, config=config
                )
                try:
                    err = rel_error(fn(), ref)
                    ms = time_ms(fn)
                    timings.append(dict(config=config, ms=ms, gbps=bytes_moved / ms / 1e6, rel_err=err))
                except Exception as e:
                    timings.append(dict(config=config, error=f"{type(e).__name__}: {str(e)[:200]}"))
            ok = sorted((t for t in timings if "ms" in t), key=lambda t: t["ms"])
            default = nf4_triton.matmul_config(m, n, k, 64, sm_count)
            default_t = [t for t in ok if all(t["config"][key] == default[key] for key in t["config"])]
            default_ms = fmt(default_t[0]) if default_t else "not in grid"
            print(f"sweep {name} M={m}: default {default} -> {default_ms}", flush=True)
            for t in ok[:4]:
                c = t["config"]
                tile = f"BN={c['BLOCK_N']:<3} stages={c['num_stages']} SK={c['SPLIT_K']:<2} warps={c['num_warps']}"
                print(f"    {tile}: {fmt(t)}", flush=True)
            failed = [t for t in timings if "error" in t]
            if failed:
                print(f"    {len(failed)} configs failed, first: {failed[0]['error']}", flush=True)
            results.append(dict(shape=name, m=m, default=default, timings=timings))
    return results


VARIANTS = {  # name -> overrides of matmul_config's choice (--nf4-variants)
    "gather": lambda c: {"USE_ASM": False},  # table gathers from memory instead of the PTX prmt lookup
    "prmt": lambda c: {},  # the default: register table (PTX prmt)
    "prmt-w8": lambda c: {"num_warps": 8},
    "prmt-st4": lambda c: {"num_stages": 4},
    "prmt-st2": lambda c: {"num_stages": 2},
    "prmt-sk2x": lambda c: {"SPLIT_K": c["SPLIT_K"] * 2},
    "prmt-sk0.5x": lambda c: {"SPLIT_K": max(1, c["SPLIT_K"] // 2)},
    "prmt-bn": lambda c: {"BLOCK_N": 192 - c["BLOCK_N"]},
}


def variant_config(name, m, n, k, sm_count):
    config = {**(default := nf4_triton.matmul_config(m, n, k, 64, sm_count)), **VARIANTS[name](default)}
    if m > config["BLOCK_M"]:
        config["SPLIT_K"] = 1
    return config


def nf4_variants(device, dtype, time_ms, rows=(1, 7, 32, 64), names=None):
    """The decode shapes under each kernel variant: error, time, GB/s; then a decode step per variant."""
    if names is None and os.environ.get("NF4_VARIANTS"):  # e.g. NF4_VARIANTS=gather,prmt
        names = os.environ["NF4_VARIANTS"].split(",")
    sm_count = multiprocessor_count(device)
    names = names or list(VARIANTS)
    shapes = [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]
    if device.type == "cuda":
        precompile((m, variant_config(v, m, n, k, sm_count)) for _, k, n in shapes for m in rows for v in names)
    results = []
    for name, k, n in shapes:
        w = NF4Weight.from_bnb(random_param(k, n, device), backend="triton")
        w_fp32 = w.dequantize(torch.float32)
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = x.float() @ w_fp32.T
            bytes_moved = w.nbytes + x.nbytes + m * n * x.element_size()
            row = dict(shape=name, m=m)
            for v in names:
                config = variant_config(v, m, n, k, sm_count)
                out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
                fn = lambda: nf4_triton.nf4_matmul(  # noqa: E731
                    x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64, out=out, config=config
                )
                try:
                    fn()
                    err = rel_error(out, ref)
                    ms = time_ms(fn)
                    zero = int(w.tile_counters.abs().sum()) == 0
                    row[v] = dict(ms=ms, gbps=bytes_moved / ms / 1e6, rel_err=err, counters_zero=zero)
                except Exception as e:
                    row[v] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(row)
            best = min((v for v in names if "ms" in row[v]), key=lambda v: row[v]["ms"], default=None)
            print(f"{name:<20} M={m:<3} best {best}", flush=True)
            for v in names:
                print(f"    {v:<12} {fmt(row[v])}", flush=True)
    # a decode step's NF4 matmuls (8 layers), per variant
    params = [[random_param(k, n, device) for _, k, n in shapes] for _ in range(8)]
    weights = [[NF4Weight.from_bnb(p, backend="triton") for p in layer] for layer in params]
    nbytes = sum(w.nbytes for layer in weights for w in layer)
    for m in (1, 32, 64):
        xs = {k: torch.randn(m, k, device=device, dtype=dtype) for _, k, _ in shapes}
        for v in [v for v in ("before", "gather", "prmt", "prmt-bk256", "prmt-w8", "prmt-st4") if v in names]:

            def step(v=v):
                for layer in weights:
                    for (_, k, n), w in zip(shapes, layer):
                        nf4_triton.nf4_matmul(xs[k], w.packed, w.absmax, w.code_fp16, w.tile_counters, 64,
                                              config=variant_config(v, m, n, k, sm_count))

            try:
                ms = time_ms(step, calls=3)
                r = dict(variant=v, m=m, ms=ms, gbps=nbytes / ms / 1e6)
            except Exception as e:
                r = dict(variant=v, m=m, error=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(r)
            print(f"decode step NF4 matmuls, 8 layers, {v:<8} M={m:<3}: {fmt(r)}", flush=True)
    return results


def bench_decode_step(device, dtype, time_ms, layers=8):
    """The NF4 matmuls of `layers` decoder layers (fused projections) in one graph, per backend."""
    shapes = {name: (k, n) for name, k, n in MISTRAL_SHAPES if name in DECODE_SHAPES}
    params = [[random_param(k, n, device) for k, n in shapes.values()] for _ in range(layers)]
    results = []
    for backend in ("triton", "cuda", "bnb", "fp16 cublas"):
        if backend == "fp16 cublas":
            weights = [[NF4Weight.from_bnb(p, backend="reference").dequantize(dtype) for p in layer] for layer in params]
            nbytes = sum(w.nbytes for layer in weights for w in layer)
        else:
            weights = [[NF4Weight.from_bnb(p, backend=backend) for p in layer] for layer in params]
            nbytes = sum(w.nbytes for layer in weights for w in layer)
        for m in (1, 8, 32, 64):
            xs = {k: torch.randn(m, k, device=device, dtype=dtype) for k, _ in shapes.values()}

            def step():
                for layer in weights:
                    for (k, _), w in zip(shapes.values(), layer):
                        F.linear(xs[k], w) if backend == "fp16 cublas" else nf4_linear(xs[k], w)

            try:
                ms = time_ms(step, calls=3)
                r = dict(backend=backend, m=m, layers=layers, gb=nbytes / 1e9, ms=ms, gbps=nbytes / ms / 1e6)
            except Exception as e:
                r = dict(backend=backend, m=m, error=f"{type(e).__name__}: {e}")
            results.append(r)
            print(f"decode step NF4 matmuls, {layers} layers, {backend:<11} M={m:<3}: {fmt(r)}", flush=True)
        del weights
    return results


def bench_attention(device, dtype, time_ms, smoke, sweep):
    n_heads, n_kv_heads, head_dim = (8, 2, 32) if smoke else (32, 8, 128)
    cases = [(2, 64), (3, 160)] if smoke else [(b, L) for b in (1, 32, 64) for L in (256, 4096)]
    configs = [dict(block_len=64, num_warps=4, num_stages=3)]
    if sweep:
        configs = [
            dict(block_len=bl, num_warps=nw, num_stages=ns) for bl in (32, 64, 128) for nw in (4, 8) for ns in (2, 3, 4)
        ]
    results = []
    for batch, cache_len in cases:
        q = torch.randn(batch, n_heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, n_kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        lengths = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
        lengths[0] = cache_len - 5  # a ragged row
        scale = head_dim**-0.5
        ref = decode_attention_reference(q.float(), k.float(), v.float(), lengths, scale)
        bytes_moved = 2 * k.nbytes + 2 * q.nbytes
        row = dict(batch=batch, cache_len=cache_len)
        candidates = {"triton": lambda: decode_attention(q, k, v, lengths, scale)}
        candidates["reference"] = lambda: decode_attention_reference(q, k, v, lengths, scale)
        for label, fn in candidates.items():
            try:
                err = rel_error(fn(), ref)
                ms = time_ms(fn)
                row[label] = dict(ms=ms, gbps=bytes_moved / ms / 1e6, rel_err=err)
            except Exception as e:
                row[label] = dict(error=f"{type(e).__name__}: {e}")
        if sweep:
            timings = []
            for c in configs:
                fn = lambda: attention_triton.decode_attention(q, k, v, lengths, scale, **c)  # noqa: E731
                try:
                    ms = time_ms(fn)
                    timings.append(dict(config=c, ms=ms, gbps=bytes_moved / ms / 1e6))
                except Exception as e:
                    timings.append(dict(config=c, error=f"{type(e).__name__}: {str(e)[:200]}"))
            row["sweep"] = timings
            best = sorted((t for t in timings if "ms" in t), key=lambda t: t["ms"])[:3]
            row["sweep_best"] = [f"{t['config']}: {fmt(t)}" for t in best]
        row.update(rotary_attention(q, k, v, lengths, scale, time_ms))
        results.append(row)
        cells = " | ".join(f"{label}: {fmt(row[label])}" for label in ("triton", "reference", "rotary_fused", "rotary_steps"))
        print(f"attention batch={batch:<3} cache={cache_len:<5} | {cells} | caches equal: {row['rotary_caches_equal']}",
              flush=True)
        for line in row.get("sweep_best", []):
            print(f"    {line}", flush=True)
    return results


def rotary_attention(q, k, v, lengths, scale, time_ms):
    """The decode step's attention as one launch (`decode_attention_rotary`: rotary, cache write, attention)
    against the same steps in eager PyTorch (rotate, an indexed cache write, `decode_attention`; the compiled
    decode step ran them as three inductor kernels and the attention): error against the fp32 reference,
    time, and whether both leave the same cache."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_len = k.shape[1], k.shape[2]
    qkv = torch.randn(batch, (n_heads + 2 * n_kv_heads) * head_dim, device=q.device, dtype=q.dtype)
    positions = (lengths - 1).long()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=q.device) / head_dim))
    emb = torch.outer(torch.arange(max_len, dtype=torch.float, device=q.device), inv_freq).repeat(1, 2)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    k_ref, v_ref = k.float(), v.float()
    ref = decode_attention_rotary_reference(qkv.float(), k_ref, v_ref, positions, cos.float(), sin.float(), n_heads, scale)
    k_fused, v_fused, k_steps, v_steps = k.clone(), v.clone(), k.clone(), v.clone()

    def fused():
        return decode_attention_rotary(qkv, k_fused, v_fused, positions, cos, sin, n_heads, scale)

    def steps():
        parts = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
        q_new, k_new, v_new = (t.reshape(batch, -1, head_dim) for t in parts)
        c, s = cos[positions][:, None], sin[positions][:, None]
        rows = torch.arange(batch, device=q.device)
        k_steps[rows, :, positions] = rotate(k_new, c, s)
        v_steps[rows, :, positions] = v_new
        return decode_attention(rotate(q_new, c, s), k_steps, v_steps, lengths, scale)

    row = {}
    for label, fn in (("rotary_fused", fused), ("rotary_steps", steps)):
        try:
            err = rel_error(fn(), ref)
            ms = time_ms(fn)
            row[label] = dict(ms=ms, gbps=(2 * k.nbytes * lengths.float().mean().item() / max_len) / ms / 1e6, rel_err=err)
        except Exception as e:
            row[label] = dict(error=f"{type(e).__name__}: {e}")
    row["rotary_caches_equal"] = torch.equal(k_fused, k_steps) and torch.equal(v_fused, v_steps)
    return row


def check_compile_and_determinism(device, dtype):
    """One CUDA graph for nf4_linear + decode_attention, equal to eager; split-K repeatable."""
    w = NF4Weight.from_bnb(random_param(4096, 4096, device), backend="triton")
    x = torch.randn(32, 4096, device=device, dtype=dtype)
    q = torch.randn(32, 32, 128, device=device, dtype=dtype)
    k = torch.randn(32, 8, 512, 128, device=device, dtype=dtype)
    v = torch.randn_like(k)
    lengths = torch.randint(1, 512, (32,), dtype=torch.int32, device=device)
    for t in (w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters, k, v):
        torch._dynamo.mark_static_address(t)

    def step(x, q, lengths):
        return nf4_linear(x, w), decode_attention(q, k, v, lengths, 128**-0.5, 64)

    eager = step(x, q, lengths)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out = compiled(x, q, lengths)
    same = [torch.equal(a, b) for a, b in zip(out, eager)]

    config = dict(BLOCK_M=32, BLOCK_N=64, SPLIT_K=8, num_warps=4, num_stages=3)
    first = nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64, config=config)
    repeats = [
        nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64, config=config) for _ in range(200)
    ]
    identical = all(torch.equal(first, r) for r in repeats)
    counters_zero = int(w.tile_counters.abs().sum()) == 0
    result = dict(compiled_equals_eager=same, split_k_bit_identical_200_calls=identical, counters_zero=counters_zero)
    print(f"compile + determinism: {result}", flush=True)
    return result


def save(report):
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_kernels.json"), "w") as f:
            json.dump(report, f, default=str)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time grids of kernel configurations")
    parser.add_argument("--sweep-seconds", type=float, default=200, help="stop the NF4 sweep after this long")
    parser.add_argument("--nf4-variants", action="store_true", help="only: NF4 kernel variants on the decode shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--only", help="comma-separated sections to run (nf4, attention, swiglu, norm, norm_fold, decode_step, compile, sweep)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16
    time_ms = timer(device)
    report = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        sm_count=multiprocessor_count(device),
        torch=torch.__version__,
        triton=triton.__version__,
        bitsandbytes=bnb.__version__,
    )
    print(json.dumps(report), flush=True)
    shapes = SMOKE_SHAPES if args.smoke else MISTRAL_SHAPES
    sweep_shapes = SMOKE_SHAPES if args.smoke else [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]
    deadline = time.monotonic() + args.sweep_seconds
    sections = {
        "nf4": lambda: bench_nf4(shapes, [1, 7, 32] if args.smoke else [1, 8, 32, 64, 128, 4096], device, dtype, time_ms),
        "attention": lambda: bench_attention(device, dtype, time_ms, args.smoke, args.sweep and device.type == "cuda"),
    }
    if device.type == "cuda":
        sections["swiglu"] = lambda: bench_swiglu(device, dtype, time_ms, args.smoke)
        sections["norm"] = lambda: bench_norm(device, dtype, time_ms)
        sections["norm_fold"] = lambda: bench_norm_fold(device, dtype, time_ms)
        sections["decode_step"] = lambda: bench_decode_step(device, dtype, time_ms)
        sections["compile"] = lambda: check_compile_and_determinism(device, dtype)
    if args.nf4_variants:
        sections = {"nf4_variants": lambda: nf4_variants(device, dtype, time_ms)}
    if args.sweep:
        rows = [7] if args.smoke else [1, 32, 64]
        sections["sweep"] = lambda: sweep_nf4(sweep_shapes, rows, device, dtype, time_ms, deadline)
    if args.only:
        sections = {name: run for name, run in sections.items() if name in args.only.split(",")}
    for name, run in sections.items():
        start = time.monotonic()
        try:
            report[name] = run()
        except Exception:
            traceback.print_exc()
            report[name] = dict(error=traceback.format_exc(limit=3))
        print(f"[{name}: {time.monotonic() - start:.0f} s]", flush=True)
        save(report)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
