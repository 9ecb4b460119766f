"""Experiment (not used by the package): an NF4 matmul in Gluon with no shared memory at all.

    python bench/experiments/nf4_gluon.py        # on an sm80+ GPU; prints a table, writes $OUT/nf4_gluon.json

The Triton kernel (`mistral_t4.kernels.nf4_triton`) stages the dequantized weight tile
through shared memory before the tensor cores read it, and Nsight Compute showed its warps
waiting on shared memory. This version, written in Gluon (Triton's layout-explicit
dialect), loads the packed bytes and x straight into the registers the mma.sync (m16n8k16)
operands live in: K is permuted inside each 64-wide block, identically for W and x (a dot
product does not care about the order of its terms), so that every thread's 16 bytes of
W and 16 halves of x are contiguous in memory (128-bit loads), and `convert_layout(...,
assert_trivial=True)` proves that no data moves between threads. Same halves byte layout,
same PTX table lookup, same split-K scheme. It compiles to 0 bytes of shared memory, 136
registers and no spills (sm90).

Result (H200, bench/experiments/nf4_gluon_h200_2026-11-26.json): correct (relative error
3.8e-4) but not faster: 0.45-1.24 TB/s of NF4 against 0.6-1.3 for the Triton kernel (slower
at 32 and 64 rows, equal at 1). With the operand round trip gone, the ~3 instructions per
weight of the table lookup and the unpipelined loads set the pace; so the package keeps the
Triton kernel, which the interpreter can also test on CPU.
"""
import itertools
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from mistral_t4.kernels.nf4_triton import _NF4_LOOKUP_PTX  # noqa: E402 - the same lookup as the Triton kernel

_PTX = _NF4_LOOKUP_PTX.value


def layouts(block_n, block_m, num_warps):
    """(load layout of the byte tile, load layout of x^T tile, mma layout, A layout, B layout)."""
    def log2(v):
        return v.bit_length() - 1
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # bytes (BLOCK_N, 64): thread (g, c) of warp w: rows 16w + g (+8, + reps), columns 16c .. 16c + 15
    n_reps = block_n // (16 * num_warps)
    load_a = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0]] + [[16 * num_warps << i, 0] for i in range(log2(n_reps))],
        lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(log2(num_warps))],
        block_bases=[], shape=[block_n, 64])
    m_reps = block_m // 8
    load_b = gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0]] + [[0, 8 << i] for i in range(log2(m_reps))],
        lane_bases=[[16, 0], [32, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0] for i in range(log2(num_warps))],
        block_bases=[], shape=[64, block_m])
    return load_a, load_b, mma, a, b


@gluon.jit
def _unpermute_a(t, BLOCK_N: gl.constexpr):
    # column p = 16c + 4f + 2eh + el  ->  k = 16f + 8eh + 2c + el
    t = t.reshape(BLOCK_N, 4, 4, 2, 2)
    t = t.permute(0, 2, 3, 1, 4)
    return t.reshape(BLOCK_N, 64)


@gluon.jit
def _unpermute_b(t, BLOCK_M: gl.constexpr):
    t = t.reshape(4, 4, 2, 2, BLOCK_M)
    t = t.permute(1, 2, 0, 3, 4)
    return t.reshape(64, BLOCK_M)


@gluon.jit
def _gl_nf4_kernel(x_ptr, packed_ptr, absmax_ptr, lut_ptr, out_ptr, partial_ptr, counter_ptr,
                   M, N, K, stride_xm, stride_om, stride_pn, stride_an,
                   LOAD_A: gl.constexpr, LOAD_B: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr,
                   BLOCKSIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr,
                   PTX: gl.constexpr):
    gl.static_assert(BLOCKSIZE == 64)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD_A))
    offs_p = gl.arange(0, 64, layout=gl.SliceLayout(0, LOAD_A))
    offs_kx = gl.arange(0, 64, layout=gl.SliceLayout(1, LOAD_B))
    offs_mx = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, LOAD_B))
    mask_n = offs_n < N
    mask_mx = offs_mx < M
    n_blocks = K // BLOCKSIZE
    n_steps = gl.cdiv(n_blocks, 2)
    per = gl.cdiv(n_steps, SPLIT_K)
    first = pid_k * per
    last = gl.minimum(first + per, n_steps)

    p_tile = packed_ptr + offs_n[:, None] * stride_pn + offs_p[None, :]
    a_row = absmax_ptr + offs_n * stride_an
    x_tile = x_ptr + offs_mx[None, :].to(gl.int64) * stride_xm + offs_kx[:, None]
    pmask = mask_n[:, None] & (offs_p[None, :] < 64)
    xmask = mask_mx[None, :] & (offs_kx[:, None] < 64)

    lb0 = gl.load(lut_ptr + 0)
    lb1 = gl.load(lut_ptr + 1)
    lb2 = gl.load(lut_ptr + 2)
    lb3 = gl.load(lut_ptr + 3)
    hb0 = gl.load(lut_ptr + 4)
    hb1 = gl.load(lut_ptr + 5)
    hb2 = gl.load(lut_ptr + 6)
    hb3 = gl.load(lut_ptr + 7)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
    nxt = gl.load(p_tile + first * BLOCKSIZE, mask=pmask & (first < last), other=0)
    for step in range(first, last):
        packed = nxt
        nxt = gl.load(p_tile + (step + 1) * BLOCKSIZE, mask=pmask & (step + 1 < last), other=0)
        has_lo = 2 * step + 1 < n_blocks
        x_hi = gl.load(x_tile + step * 2 * BLOCKSIZE, mask=xmask, other=0.0)
        x_lo = gl.load(x_tile + step * 2 * BLOCKSIZE + BLOCKSIZE, mask=xmask & has_lo, other=0.0)
        s_hi = gl.load(a_row + 2 * step, mask=mask_n, other=0.0).to(gl.float16)
        s_lo = gl.load(a_row + 2 * step + 1, mask=mask_n & has_lo, other=0.0).to(gl.float16)
        sh = gl.broadcast(s_hi[:, None], packed)[0]
        sl = gl.broadcast(s_lo[:, None], packed)[0]
        w_hi, w_lo = gl.inline_asm_elementwise(
            PTX, "=r,=r,=r,=r" + ",r" * 37,
            [packed, sh, sl, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3],
            dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
        a_hi = gl.convert_layout(_unpermute_a(w_hi, BLOCK_N), A_L, assert_trivial=True)
        a_lo = gl.convert_layout(_unpermute_a(w_lo, BLOCK_N), A_L, assert_trivial=True)
        b_hi = gl.convert_layout(_unpermute_b(x_hi, BLOCK_M), B_L, assert_trivial=True)
        b_lo = gl.convert_layout(_unpermute_b(x_lo, BLOCK_M), B_L, assert_trivial=True)
        acc = mma_v2(a_hi, b_hi, acc)
        acc = mma_v2(a_lo, b_lo, acc)

    offs_on = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    offs_om = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    out_mask = (offs_on < N)[:, None] & (offs_om < M)[None, :]
    out_offsets = offs_om[None, :].to(gl.int64) * stride_om + offs_on[:, None]
    if SPLIT_K == 1:
        gl.store(out_ptr + out_offsets, acc.to(gl.float16), mask=out_mask)
    else:
        tile_offsets = offs_om[None, :].to(gl.int64) * N + offs_on[:, None]
        gl.store(partial_ptr + pid_k * M * N + tile_offsets, acc, mask=out_mask)
        gl.thread_barrier()
        arrived = gl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
            for split in range(SPLIT_K):
                total += gl.load(partial_ptr + split * M * N + tile_offsets, mask=out_mask, cache_modifier=".cg")
            gl.store(out_ptr + out_offsets, total.to(gl.float16), mask=out_mask)
            gl.atomic_xchg(counter_ptr + pid_n, 0)


def lut_words(code_fp16: torch.Tensor) -> torch.Tensor:
    """The 16 fp16 table entries as 8 int32 words: low bytes of entries 0-3, 4-7, 8-11, 12-15, then high bytes."""
    bits = code_fp16.view(torch.int16).to(torch.int64).cpu() & 0xFFFF
    words = []
    for plane in (0, 8):
        for w in range(4):
            v = 0
            for i in range(4):
                v |= ((int(bits[4 * w + i]) >> plane) & 0xFF) << (8 * i)
            words.append(v - (1 << 32) if v >= 1 << 31 else v)
    return torch.tensor(words, dtype=torch.int32, device=code_fp16.device)


def gl_matmul(x, packed, absmax, lut, counters, n, config, out=None):
    """x (M, K) fp16; packed (N, K/2) uint8 halves layout row-major; absmax (N, K/64) fp32 row-major."""
    m, k = x.shape
    bm, bn, sk, nw = config["BLOCK_M"], config["BLOCK_N"], config["SPLIT_K"], config["num_warps"]
    la, lb, mma, a, b = layouts(bn, bm, nw)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.empty((sk, m, n), dtype=torch.float32, device=x.device) if sk > 1 else out
    grid = (triton.cdiv(n, bn), sk, triton.cdiv(m, bm))
    _gl_nf4_kernel[grid](x, packed, absmax, lut, out, partial, counters, m, n, k, x.stride(0), out.stride(0),
                         packed.stride(0), absmax.stride(0), la, lb, mma, a, b, 64, bm, bn, sk, _PTX,
                         num_warps=nw)
    return out


def main():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, random_param, rel_error, timer

    from mistral_t4.kernels import NF4Weight, multiprocessor_count, nf4_triton

    device = torch.device("cuda")
    time_ms, sm_count = timer(device), multiprocessor_count(device)
    counters = torch.zeros(4096, dtype=torch.int32, device=device)
    results = []
    for name, k, n in [s for s in MISTRAL_SHAPES if s[0] in DECODE_SHAPES]:
        w = NF4Weight.from_bnb(random_param(k, n, device), backend="triton")  # halves layout, row-major
        lut = lut_words(w.code_fp16)
        w_fp32 = w.dequantize(torch.float32)
        for m in (1, 32, 64):
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = x.float() @ w_fp32.T
            nbytes = w.nbytes + x.nbytes + m * n * 2
            row = dict(shape=name, m=m)
            fn = lambda: nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, 64)  # noqa: E731
            row["triton"] = dict(ms=time_ms(fn), rel_err=rel_error(fn(), ref))
            best = None
            for bm, bn, nw, sk in itertools.product([max(8, triton.next_power_of_2(m))], (64, 128), (4, 8), (1, 2, 4, 8)):
                if bn < 16 * nw:
                    continue
                config = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, SPLIT_K=sk)
                fn = lambda: gl_matmul(x, w.packed, w.absmax, lut, counters, n, config)  # noqa: E731
                r = dict(ms=time_ms(fn), rel_err=rel_error(fn(), ref), config=config)
                best = r if best is None or r["ms"] < best["ms"] else best
            row["gluon"] = best
            for key in ("triton", "gluon"):
                row[key]["gbps"] = nbytes / row[key]["ms"] / 1e6
            results.append(row)
            print(f"{name:<22} M={m:<3} triton {row['triton']['gbps']:6.0f} GB/s | gluon {best['gbps']:6.0f} GB/s "
                  f"(err {best['rel_err']:.1e}, {best['config']})", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "nf4_gluon.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), sm_count=sm_count, results=results), f)


if __name__ == "__main__":
    main()
