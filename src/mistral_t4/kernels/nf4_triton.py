"""Triton kernels for NF4 weights (sm80+): a fused dequantize-matmul and a plain dequantize.

Reference: `nf4.py`. The Triton backend keeps its own byte order, made once at load by
`to_halves` (undone by `from_halves`): a row's K range is cut into steps of two
quantization blocks, and byte j of step s holds W[n, 2Bs + j] in its high nibble and
W[n, 2Bs + B + j] in its low one (B = blocksize, 0 <= j < B). So the high nibbles of a
step are one whole block and the low nibbles the next: one scale per row for each half,
and x's two halves are plain contiguous slices. bitsandbytes pairs W[n, 2j] with
W[n, 2j + 1] instead, which makes every tile an even/odd interleave to split. Both
tensors are row-major: packed (N, B * steps) uint8, absmax (N, K // B) fp32. An odd block
count pads the last step's low nibbles with index 7 (the table's 0.0) and scale 0.

`nf4_matmul` (decode, a few rows): out = x @ W.T without ever writing W in fp16.
  * Swapped operands. A tensor-core tile has at least 16 rows, decode has 1..64. So the
    kernel computes out.T = W @ x.T: weight rows fill the MMA's M side (64 or 128), the
    few activation rows its N side (padded to 16).
  * A loop step is one step of the layout: a (BLOCK_N, B) byte tile, looked up into
    W_hi and W_lo, and two dots: W_hi @ x[:, 2Bs : 2Bs + B].T + W_lo @ x[:, 2Bs + B :
    2Bs + 2B].T. Triton pipelines the byte, scale and x loads through shared memory.
  * The lookup (fp16 on a GPU, USE_ASM): the table lives in registers as 8 words, the low
    and the high bytes of its 16 fp16 entries, and PTX byte permutes (`prmt`) pick them
    by nibble: 16 prmt + 6 logic ops + 4 fp16x2 scale multiplies per 32-bit word of 8
    weights (`_nf4_lookup_asm`), no memory access. Elsewhere (fp32, Triton's CPU
    interpreter, which cannot run PTX) a gather from the table in memory, which stays in L1.
  * Split-K. Decode shapes have few output tiles (4096 / 64 = 64) for 100+ SMs, so
    SPLIT_K programs share a tile's K range. Each writes its fp32 partial to a workspace
    and bumps the tile's counter; the last to arrive sums the partials in order
    0..SPLIT_K-1 (deterministic) and resets the counter to 0 for the next call. One
    launch, nothing to zero beforehand, safe to capture in a CUDA graph.
Measured on an H200 (bench/results/nf4_sweep_h200_2026-11-26_halves.json; decode
shapes, M = 1/32/64): this layout is 5-25% faster than the previous column-major
bitsandbytes order (0.5-1.1 -> 0.6-1.3 TB/s of NF4). What limits it (Nsight Compute):
issue, not DRAM: ~1.7 warps per scheduler, one eligible a third of the time, waiting on
shared memory (the dequantized tile goes registers -> shared -> registers before the
MMA). A Gluon version with no shared memory at all (mma.sync, operands loaded straight
into their registers, K permuted inside a block so that each thread's bytes are
contiguous) was correct but no faster (0.45-1.24 TB/s): the lookup's ~3 instructions
per weight set the pace.

`nf4_dequantize` (prefill): W in fp16/fp32, bit-identical to the reference, for cuBLAS.
"""
import os

import torch
import triton
import triton.language as tl

from . import multiprocessor_count

# Triton picks its interpreter when a kernel is decorated, from this variable.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# byte permutes of the 16-entry fp16 table held in registers (see _nf4_lookup_asm).
_NF4_LOOKUP_PTX = tl.constexpr("""{
.reg .b32 q, s, a, b, l, h, e0, o0, e1, o1;
and.b32 q, $4, 0x77777777;
shr.b32 s, $4, 1;
lop3.b32 s, s, 0x44444444, 0x32103210, 0xEA;
prmt.b32 a, $9, $13, q;
prmt.b32 b, $17, $21, q;
prmt.b32 l, a, b, s;
prmt.b32 a, $25, $29, q;
prmt.b32 b, $33, $37, q;
prmt.b32 h, a, b, s;
prmt.b32 e0, l, h, 0x7351;
prmt.b32 o0, l, h, 0x6240;
shr.b32 q, q, 16;
shr.b32 s, s, 16;
prmt.b32 a, $9, $13, q;
prmt.b32 b, $17, $21, q;
prmt.b32 l, a, b, s;
prmt.b32 a, $25, $29, q;
prmt.b32 b, $33, $37, q;
prmt.b32 h, a, b, s;
prmt.b32 e1, l, h, 0x7351;
prmt.b32 o1, l, h, 0x6240;
mul.rn.f16x2 $0, e0, $5;
mul.rn.f16x2 $1, e1, $6;
mul.rn.f16x2 $2, o0, $7;
mul.rn.f16x2 $3, o1, $8;
}""")


@triton.jit
def _table_planes(code_ptr):
    """The 16 fp16 table entries as 8 words: low bytes of entries 0-3, 4-7, 8-11, 12-15, then high bytes."""
    idx = tl.arange(0, 16)
    bits = tl.load(code_ptr.to(tl.pointer_type(tl.int16)) + idx).to(tl.int32) & 0xFFFF
    shift = (idx % 4) * 8
    word = idx // 4
    low = (bits & 0xFF) << shift
    high = (bits >> 8) << shift
    lb0 = tl.sum(tl.where(word == 0, low, 0))
    lb1 = tl.sum(tl.where(word == 1, low, 0))
    lb2 = tl.sum(tl.where(word == 2, low, 0))
    lb3 = tl.sum(tl.where(word == 3, low, 0))
    hb0 = tl.sum(tl.where(word == 0, high, 0))
    hb1 = tl.sum(tl.where(word == 1, high, 0))
    hb2 = tl.sum(tl.where(word == 2, high, 0))
    hb3 = tl.sum(tl.where(word == 3, high, 0))
    return lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3


@triton.jit
def _nf4_lookup_asm(packed, scale_hi, scale_lo, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3):
    """(code[packed >> 4] * scale_hi, code[packed & 15] * scale_lo) in fp16, with no memory access.

    4 bytes per asm instance (one 32-bit register, pack=4): a byte permute `prmt` picks
    bytes from an 8-byte table by the low 3 bits of 4 selector nibbles, so the low and
    high bytes of the 16 fp16 entries are looked up in entries 0-7 and 8-15 and chosen by
    each nibble's bit 3, then interleaved into fp16 pairs and scaled by fp16x2 multiplies:
    16 prmt, 6 logic ops and 4 multiplies for 8 weights.
    """
    return tl.inline_asm_elementwise(
        _NF4_LOOKUP_PTX,
        "=r,=r,=r,=r" + ",r" * 37,
        [packed, scale_hi, scale_lo, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # (M, K), rows `stride_xm` apart
    packed_ptr,  # (N, BLOCKSIZE * steps) uint8, the halves layout, row-major
    absmax_ptr,  # (N, K // BLOCKSIZE) fp32, row-major
    code_ptr,  # (16,) NF4 table in x's dtype
    out_ptr,  # (M, N), rows `stride_om` apart
    partial_ptr,  # (SPLIT_K, M, N) fp32 workspace, unused if SPLIT_K == 1
    counter_ptr,  # (>= cdiv(N, BLOCK_N),) int32, zero on entry and on exit
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_pn,
    stride_an,
    BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_ASM: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCKSIZE)
    mask_n = offs_n < N
    mask_m = offs_m < M

    n_blocks = K // BLOCKSIZE
    n_steps = tl.cdiv(n_blocks, 2)
    steps_per_split = tl.cdiv(n_steps, SPLIT_K)
    first_step = pid_k * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, n_steps)

    packed_tile = packed_ptr + offs_n[:, None] * stride_pn + offs_j[None, :]  # (BLOCK_N, BLOCKSIZE)
    absmax_rows = absmax_ptr + offs_n * stride_an
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_j[None, :]  # (BLOCK_M, BLOCKSIZE)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out.T tile
    if USE_ASM:  # the fp16 table as byte planes, in registers for the whole kernel
        lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3 = _table_planes(code_ptr)
    for step in range(first_step, last_step):
        has_lo = 2 * step + 1 < n_blocks  # an odd block count leaves the last step's low half empty
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
        tl.debug_barrier()  # every thread's partial is stored before the counter says so
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in range(SPLIT_K):  # ".cg": read from L2, where the other SMs wrote
                total += tl.load(partial_ptr + split * M * N + tile_offsets, mask=out_mask, cache_modifier=".cg")
            tl.store(out_ptr + out_offsets, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,  # (N, BLOCKSIZE * steps) uint8, the halves layout, row-major
    absmax_ptr,  # (N, K // BLOCKSIZE) fp32, row-major
    code_ptr,  # (16,) fp32
    out_ptr,  # (N, K), row-major
    N,
    K,
    stride_pn,
    stride_an,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    step = tl.program_id(1)
    offs_j = tl.arange(0, BLOCKSIZE)
    mask_n = offs_n < N
    has_lo = 2 * step + 1 < K // BLOCKSIZE
    packed = tl.load(packed_ptr + offs_n[:, None] * stride_pn + step * BLOCKSIZE + offs_j[None, :], mask=mask_n[:, None])
    scale_hi = tl.load(absmax_ptr + offs_n * stride_an + 2 * step, mask=mask_n)
    scale_lo = tl.load(absmax_ptr + offs_n * stride_an + 2 * step + 1, mask=mask_n & has_lo)
    w_hi = tl.load(code_ptr + (packed >> 4)) * scale_hi[:, None]  # fp32 products, as bitsandbytes computes them
    w_lo = tl.load(code_ptr + (packed & 0xF)) * scale_lo[:, None]
    out_rows = out_ptr + offs_n[:, None].to(tl.int64) * K + 2 * step * BLOCKSIZE + offs_j[None, :]
    tl.store(out_rows, w_hi.to(out_ptr.dtype.element_ty), mask=mask_n[:, None])
    tl.store(out_rows + BLOCKSIZE, w_lo.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & has_lo)


def to_halves(packed: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes' (N, K // 2) byte order -> the halves layout (N, blocksize * steps), row-major."""
    n, k = packed.shape[0], packed.shape[1] * 2
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n, k)  # 4-bit indices in K order
    if (k // blocksize) % 2:  # pad the last step's low half with index 7, the table's 0.0
        q = torch.cat([q, q.new_full((n, blocksize), 7)], dim=1)
    q = q.reshape(n, -1, 2, blocksize)  # (rows, steps, high/low half, byte)
    return ((q[:, :, 0] << 4) | q[:, :, 1]).reshape(n, -1).contiguous()


def from_halves(packed: torch.Tensor, blocksize: int, in_features: int) -> torch.Tensor:
    """The halves layout -> bitsandbytes' (N, K // 2) byte order (inverse of `to_halves`)."""
    n = packed.shape[0]
    q = torch.stack([packed >> 4, packed & 0xF], dim=1)  # (rows, high/low, steps * blocksize)
    q = q.reshape(n, 2, -1, blocksize).transpose(1, 2).reshape(n, -1)[:, :in_features]
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def matmul_config(m: int, n: int, k: int, blocksize: int, sm_count: int) -> dict:
    """Tile sizes, split-K and launch options for an (m, k) x (n, k).T NF4 matmul.

    From a sweep on an H200 (`bench/gpu_kernels.py --sweep`; decode shapes, M = 1/32/64):
    64-row weight tiles (128 for M > 32 when 64-row tiles alone would be 2.5+ per SM: the
    gate/up projection), 4 warps, 3 stages, and K split in the smallest power of two that
    gives at least `target` programs: 3.5 per SM up to 16 rows, 2 per SM up to 32, 1.6
    above (each program re-reads x, so fewer programs pay once the GPU is full). A split
    keeps at least 4 steps of K.
    """
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    block_n = 128 if m > 32 and triton.cdiv(n, 64) >= 2.5 * sm_count else 64
    target = (3.5 if m <= 16 else 2 if m <= 32 else 1.6) * sm_count
    n_tiles = triton.cdiv(n, block_n)
    n_steps = triton.cdiv(k // blocksize, 2)
    split_k = 1
    while m <= block_m and n_tiles * split_k < target and n_steps >= 8 * split_k and split_k < 16:
        split_k *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k, num_warps=4, num_stages=3)


def asm_lookup_available(x: torch.Tensor) -> bool:
    """The PTX lookup runs for fp16 on a GPU; Triton's interpreter (CPU) cannot run PTX."""
    return x.dtype == torch.float16 and x.device.type == "cuda" and not _INTERPRETED


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code_x: torch.Tensor,
    tile_counters: torch.Tensor,
    blocksize: int,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype; W in the halves layout; `code_x` is the NF4 table in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    n_blocks = k // blocksize
    assert k % blocksize == 0 and packed.shape[1] == blocksize * triton.cdiv(n_blocks, 2), "packed is not W's halves layout"
    assert absmax.shape == (n, n_blocks) and code_x.dtype == x.dtype
    assert packed.stride(1) == 1 and absmax.stride(1) == 1, "the Triton layout is row-major"
    assert packed.numel() < 2**31, "32-bit offsets"
    if x.stride(1) != 1:
        x = x.contiguous()
    config = dict(config or matmul_config(m, n, k, blocksize, multiprocessor_count(x.device)))
    use_asm = config.pop("USE_ASM", None)
    if use_asm is None:
        use_asm = asm_lookup_available(x)
    block_m, block_n, split_k = config["BLOCK_M"], config["BLOCK_N"], config["SPLIT_K"]
    m_tiles, n_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    assert split_k == 1 or (m_tiles == 1 and tile_counters.numel() >= n_tiles)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    _nf4_matmul_kernel[(n_tiles, split_k, m_tiles)](
        x,
        packed,
        absmax,
        code_x,
        out,
        partial,
        tile_counters,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        packed.stride(0),
        absmax.stride(0),
        BLOCKSIZE=blocksize,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        USE_ASM=use_asm,
        **config,
    )
    return out


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    in_features: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, K) row-major weight in `dtype`, equal to `NF4Weight.dequantize`; `code` is the fp32 table."""
    n, k = packed.shape[0], in_features
    assert packed.stride(1) == 1 and absmax.stride(1) == 1, "the Triton layout is row-major"
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    block_n = 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // blocksize, 2))
    _nf4_dequantize_kernel[grid](
        packed, absmax, code, out, n, k, packed.stride(0), absmax.stride(0), BLOCKSIZE=blocksize, BLOCK_N=block_n
    )
    return out
