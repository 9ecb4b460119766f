"""Experiment (not used by the package): three restructurings of the Triton NF4 matmul.

    python bench/experiments/nf4_triton_variants.py   # on an sm80+ GPU; writes $OUT/nf4_triton_variants.json

Same lookup and math as `mistral_t4.kernels.nf4_triton`; what changes is around it:
  * "pk": persistent programs (2-4 per SM) looping over (tile, split) work items, the
    loop flattened (`tl.range(..., flatten=True)`) so that loads run ahead across items;
  * "t1": a tile-contiguous copy of the weights (each 64-row x 128-weight step one 4 KB
    run, its scales one 512-byte run) instead of 64 separate 64-byte row pieces;
  * "np": the same kernel, one program per work item (not persistent);
  * "gemv" (M = 1): no tensor cores, fp32 FMAs into a (BLOCK_N, 64) register tile.
Result (H200, bench/experiments/nf4_triton_variants_h200_2026-11-26.json; CUDA-graph
replay with L2 flushed): all correct; best of each family per decode shape, per layer
(qkv + o + gate_up + down): M = 1 108 -> 99 us (gemv, -9%), M = 32 135 -> 125 us
(persistent + tiled, -8%), M = 64 169 -> 160 us (-6%). The tiled layout is worth 3-11% on
its own, persistence 0-10% (and costs at M = 1). None changes the picture: the table
lookup's integer work sets the pace (see bench/experiments/nf4_cuda.py, which replaces it).
"""
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

import torch
import triton
import triton.language as tl

from mistral_t4.kernels.nf4_triton import _nf4_lookup_asm, _table_planes



@triton.jit
def _pk(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om, stride_pn, stride_an,
    BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    NUM_PROGRAMS, DOT_PRECISION: tl.constexpr, USE_ASM: tl.constexpr, FLATTEN: tl.constexpr, TILED: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    n_work = n_tiles * SPLIT_K
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCKSIZE)
    mask_m = offs_m < M
    n_blocks = K // BLOCKSIZE
    n_steps = tl.cdiv(n_blocks, 2)
    steps_per_split = tl.cdiv(n_steps, SPLIT_K)
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_j[None, :]
    if USE_ASM:
        lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3 = _table_planes(code_ptr)
    for work in tl.range(pid, n_work, NUM_PROGRAMS, flatten=FLATTEN):
        pid_n = work // SPLIT_K
        pid_k = work % SPLIT_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        first_step = pid_k * steps_per_split
        last_step = tl.minimum(first_step + steps_per_split, n_steps)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if TILED:  # (n_tiles, n_steps, BLOCK_N, BLOCKSIZE) bytes, (n_tiles, n_steps, 2, BLOCK_N) scales
            packed_tile = packed_ptr + (pid_n * n_steps * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * BLOCKSIZE + offs_j[None, :]
            absmax_rows = absmax_ptr + pid_n * n_steps * 2 * BLOCK_N + tl.arange(0, BLOCK_N)
        else:
            packed_tile = packed_ptr + offs_n[:, None] * stride_pn + offs_j[None, :]
            absmax_rows = absmax_ptr + offs_n * stride_an
        for step in range(first_step, last_step):
            has_lo = 2 * step + 1 < n_blocks
            if TILED:
                packed = tl.load(packed_tile + step * BLOCK_N * BLOCKSIZE)
                scale_hi = tl.load(absmax_rows + step * 2 * BLOCK_N).to(x_ptr.dtype.element_ty)
                scale_lo = tl.load(absmax_rows + step * 2 * BLOCK_N + BLOCK_N).to(x_ptr.dtype.element_ty)
            else:
                packed = tl.load(packed_tile + step * BLOCKSIZE, mask=mask_n[:, None], other=0)
                scale_hi = tl.load(absmax_rows + 2 * step, mask=mask_n, other=0.0).to(x_ptr.dtype.element_ty)
                scale_lo = tl.load(absmax_rows + 2 * step + 1, mask=mask_n & has_lo, other=0.0).to(x_ptr.dtype.element_ty)
            x_hi = tl.load(x_tile + 2 * step * BLOCKSIZE, mask=mask_m[:, None], other=0.0)
            x_lo = tl.load(x_tile + (2 * step + 1) * BLOCKSIZE, mask=mask_m[:, None] & has_lo, other=0.0)
            if USE_ASM:
                scale_hi = tl.broadcast_to(scale_hi[:, None], packed.shape)
                scale_lo = tl.broadcast_to(scale_lo[:, None], packed.shape)
                w_hi, w_lo = _nf4_lookup_asm(packed, scale_hi, scale_lo, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3)
            else:
                w_hi = tl.load(code_ptr + (packed >> 4)) * scale_hi[:, None]
                w_lo = tl.load(code_ptr + (packed & 0xF)) * scale_lo[:, None]
            acc = tl.dot(w_hi, tl.trans(x_hi), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(w_lo, tl.trans(x_lo), acc, input_precision=DOT_PRECISION)
        out_offsets = offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        out_mask = mask_n[:, None] & mask_m[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tile_offsets = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
            tl.store(partial_ptr + pid_k * M * N + tile_offsets, acc, mask=out_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for split in tl.static_range(SPLIT_K):
                    total += tl.load(partial_ptr + split * M * N + tile_offsets, mask=out_mask, cache_modifier=".cg")
                tl.store(out_ptr + out_offsets, total.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(counter_ptr + pid_n, 0)


def pk_matmul(x, packed, absmax, code_x, counters, blocksize, config, out=None, n=None):
    import torch
    m, k = x.shape
    n = n or packed.shape[0]
    c = dict(config)
    progs = c.pop("NUM_PROGRAMS")
    flatten = c.pop("FLATTEN", True)
    tiled = c.pop("TILED", False)
    use_asm = c.pop("USE_ASM", x.dtype == torch.float16 and x.device.type == "cuda")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    sk = c["SPLIT_K"]
    partial = torch.empty((sk, m, n), dtype=torch.float32, device=x.device) if sk > 1 else out
    n_work = triton.cdiv(n, c["BLOCK_N"]) * sk
    progs = min(progs, n_work)
    _pk[(progs,)](x, packed, absmax, code_x, out, partial, counters, m, n, k, x.stride(0), out.stride(0),
                  packed.stride(0), absmax.stride(0), NUM_PROGRAMS=progs, BLOCKSIZE=blocksize,
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_ASM=use_asm,
                  FLATTEN=flatten, TILED=tiled, **c)
    return out


@triton.jit
def _gemv(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om, stride_pn, stride_an,
    BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, USE_ASM: tl.constexpr,
):
    """M == 1: out[n] = sum_k W[n, k] x[k] with fp32 FMAs, no tensor cores."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCKSIZE)
    mask_n = offs_n < N
    n_blocks = K // BLOCKSIZE
    n_steps = tl.cdiv(n_blocks, 2)
    steps_per_split = tl.cdiv(n_steps, SPLIT_K)
    first_step = pid_k * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, n_steps)
    packed_tile = packed_ptr + offs_n[:, None] * stride_pn + offs_j[None, :]
    absmax_rows = absmax_ptr + offs_n * stride_an
    acc = tl.zeros((BLOCK_N, BLOCKSIZE), dtype=tl.float32)
    if USE_ASM:
        lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3 = _table_planes(code_ptr)
    for step in range(first_step, last_step):
        has_lo = 2 * step + 1 < n_blocks
        packed = tl.load(packed_tile + step * BLOCKSIZE, mask=mask_n[:, None], other=0)
        scale_hi = tl.load(absmax_rows + 2 * step, mask=mask_n, other=0.0).to(x_ptr.dtype.element_ty)
        scale_lo = tl.load(absmax_rows + 2 * step + 1, mask=mask_n & has_lo, other=0.0).to(x_ptr.dtype.element_ty)
        x_hi = tl.load(x_ptr + 2 * step * BLOCKSIZE + offs_j).to(tl.float32)
        x_lo = tl.load(x_ptr + (2 * step + 1) * BLOCKSIZE + offs_j, mask=(offs_j < BLOCKSIZE) & has_lo, other=0.0).to(tl.float32)
        if USE_ASM:
            scale_hi = tl.broadcast_to(scale_hi[:, None], packed.shape)
            scale_lo = tl.broadcast_to(scale_lo[:, None], packed.shape)
            w_hi, w_lo = _nf4_lookup_asm(packed, scale_hi, scale_lo, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3)
        else:
            w_hi = tl.load(code_ptr + (packed >> 4)) * scale_hi[:, None]
            w_lo = tl.load(code_ptr + (packed & 0xF)) * scale_lo[:, None]
        acc += w_hi.to(tl.float32) * x_hi[None, :]
        acc += w_lo.to(tl.float32) * x_lo[None, :]
    res = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, res.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(partial_ptr + pid_k * N + offs_n, res, mask=mask_n)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(partial_ptr + split * N + offs_n, mask=mask_n, cache_modifier=".cg")
            tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.atomic_xchg(counter_ptr + pid_n, 0)


def gemv(x, packed, absmax, code_x, counters, blocksize, config, out=None):
    import torch
    m, k = x.shape
    assert m == 1
    n = packed.shape[0]
    c = dict(config)
    use_asm = c.pop("USE_ASM", x.dtype == torch.float16 and x.device.type == "cuda")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    sk = c["SPLIT_K"]
    partial = torch.empty((sk, m, n), dtype=torch.float32, device=x.device) if sk > 1 else out
    _gemv[(triton.cdiv(n, c["BLOCK_N"]), sk)](x, packed, absmax, code_x, out, partial, counters, m, n, k,
                  x.stride(0), out.stride(0), packed.stride(0), absmax.stride(0), BLOCKSIZE=blocksize,
                  USE_ASM=use_asm, **c)
    return out


def tile(packed, absmax, block_n, blocksize=64):
    """Halves layout (N, B*steps) + absmax (N, K/B) -> tile-contiguous copies; N padded to block_n."""
    import torch
    n, width = packed.shape
    steps = width // blocksize
    n_blocks = absmax.shape[1]
    pad = (-n) % block_n
    if pad:
        packed = torch.cat([packed, packed.new_full((pad, width), 0x77)])
        absmax = torch.cat([absmax, absmax.new_zeros((pad, n_blocks))])
    if n_blocks % 2:
        absmax = torch.cat([absmax, absmax.new_zeros((absmax.shape[0], 1))], dim=1)
    t = (n + pad) // block_n
    p = packed.reshape(t, block_n, steps, blocksize).permute(0, 2, 1, 3).contiguous()
    a = absmax.reshape(t, block_n, steps, 2).permute(0, 2, 3, 1).contiguous()
    return p, a


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from gpu_kernels import timer, random_param, rel_error, MISTRAL_SHAPES, DECODE_SHAPES
from mistral_t4.kernels import NF4Weight, nf4_triton, multiprocessor_count

ROWS = [int(r) for r in os.environ.get("ROWS", "1,32,64").split(",")]


def configs(m, n, k, sm):
    d = nf4_triton.matmul_config(m, n, k, 64, sm)
    out = [("base", None)]
    sks = sorted({max(1, d["SPLIT_K"] // 2), d["SPLIT_K"], min(16, d["SPLIT_K"] * 2)})
    common = dict(BLOCK_M=d["BLOCK_M"], BLOCK_N=64, num_warps=4)
    for tiled in (False, True):
        for mult in (2, 3, 4):
            for sk in sks:
                out.append((f"pk t{int(tiled)} x{mult} sk{sk}", dict(common, SPLIT_K=sk, NUM_PROGRAMS=mult * sm, TILED=tiled, num_stages=3)))
        out.append((f"pk t{int(tiled)} x3 sk{d['SPLIT_K']} st4", dict(common, SPLIT_K=d["SPLIT_K"], NUM_PROGRAMS=3 * sm, TILED=tiled, num_stages=4)))
        out.append((f"pk t{int(tiled)} x3 sk{d['SPLIT_K']} noflat", dict(common, SPLIT_K=d["SPLIT_K"], NUM_PROGRAMS=3 * sm, TILED=tiled, num_stages=3, FLATTEN=False)))
        out.append((f"np t{int(tiled)} sk{d['SPLIT_K']}", dict(common, SPLIT_K=d["SPLIT_K"], NUM_PROGRAMS=10**6, TILED=tiled, num_stages=3)))
    if m == 1:
        for bn, nw in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8)):
            for sk in (1, 2, 4, 8, 16):
                for st in (1, 3):
                    out.append((f"gemv bn{bn} w{nw} sk{sk} st{st}", dict(BLOCK_N=bn, num_warps=nw, SPLIT_K=sk, num_stages=st)))
    return out


def run(kind, cfg, x, w, tiles, out):
    if kind == "base":
        return nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64, out=out)
    if kind.startswith("gemv"):
        return gemv(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64, cfg, out=out)
    p, a = tiles if cfg.get("TILED") else (w.packed, w.absmax)
    return pk_matmul(x, p, a, w.code_fp16, w.tile_counters, 64, cfg, out=out, n=w.packed.shape[0])


def _compile_one(job):
    kind, cfg, m = job
    try:
        torch.manual_seed(0)
        w = NF4Weight.from_bnb(random_param(1024, 512, "cuda"), backend="triton")
        tiles = tile(w.packed, w.absmax, 64)
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        cfg = dict(cfg, NUM_PROGRAMS=min(cfg.get("NUM_PROGRAMS", 1), 7)) if "NUM_PROGRAMS" in cfg else cfg
        run(kind, cfg, x, w, tiles, None)
        torch.cuda.synchronize()
    except Exception as e:
        return f"{kind}: {type(e).__name__}: {str(e)[:300]}"


def main():
    dev = torch.device("cuda"); sm = multiprocessor_count(dev); t = timer(dev)
    shapes = [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]
    jobs = {}
    for _, k, n in shapes:
        for m in ROWS:
            for kind, cfg in configs(m, n, k, sm):
                if cfg is not None:
                    key = (kind.split()[0], tuple(sorted((a, b) for a, b in cfg.items() if a != "NUM_PROGRAMS")), m)
                    jobs[key] = (kind, cfg, m)
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=14, mp_context=ctx) as pool:
        errs = [e for e in pool.map(_compile_one, list(jobs.values())) if e]
    print(f"precompiled {len(jobs)} in {time.time()-t0:.0f}s, {len(errs)} errors", errs[:3], flush=True)
    results = []
    for name, k, n in shapes:
        w = NF4Weight.from_bnb(random_param(k, n, dev), backend="triton")
        tiles = tile(w.packed, w.absmax, 64)
        wf = w.dequantize(torch.float32)
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ wf.T
            rows = []
            for kind, cfg in configs(m, n, k, sm):
                out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                fn = lambda: run(kind, cfg, x, w, tiles, out)
                try:
                    fn(); torch.cuda.synchronize()
                    err = rel_error(out, ref); zero = int(w.tile_counters.abs().sum()) == 0
                    ms = t(fn)
                    rows.append(dict(kind=kind, ms=ms, err=err, zero=zero))
                except Exception as e:
                    rows.append(dict(kind=kind, error=f"{type(e).__name__}: {str(e)[:200]}"))
            ok = sorted([r for r in rows if "ms" in r and r["err"] < 2e-3 and r["zero"]], key=lambda r: r["ms"])
            bad = [r for r in rows if "ms" not in r or r["err"] >= 2e-3 or not r["zero"]]
            base = [r for r in rows if r["kind"] == "base"][0]
            print(f"{name} M={m}: base {base.get('ms', 0)*1e3:.1f} us; best:", "; ".join(f"{r['kind']} {r['ms']*1e3:.1f}" for r in ok[:5]), flush=True)
            for fam in ("pk t0", "pk t1", "np t0", "np t1", "gemv"):
                f = [r for r in ok if r["kind"].startswith(fam)]
                if f:
                    print(f"    best {fam}: {f[0]['kind']} {f[0]['ms']*1e3:.1f} us", flush=True)
            if bad:
                print("    BAD:", [(r["kind"], r.get("err"), r.get("zero"), r.get("error")) for r in bad[:4]], flush=True)
            results.append(dict(shape=name, m=m, rows=rows))
    info = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    if os.environ.get("OUT"):
        json.dump(dict(system=info, results=results), open(os.path.join(os.environ["OUT"], "nf4_triton_variants.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
