"""Triton kernels for NF4 weights (sm80+): a fused dequantize-matmul and a plain dequantize.

Reference and layout: `nf4.py`. W[n, 2j] is the high nibble and W[n, 2j + 1] the low
nibble of byte (n, j) of `packed`; one fp32 absmax per `blocksize` weights of a row. Here
both tensors are column-major: byte (n, j) at j * N + n.

`nf4_matmul` (decode, a few rows): out = x @ W.T without ever writing W in fp16.
  * Swapped operands. A tensor-core tile has at least 16 rows, decode has 1..64. So the
    kernel computes out.T = W @ x.T: weight rows fill the MMA's M side (64 or 128), the
    few activation rows its N side (padded to 16).
  * A step covers BLOCK_K of K, i.e. GROUPS quantization blocks: a (BLOCK_N, GROUPS,
    blocksize / 2) tile of bytes, each nibble looked up in the 16-entry table and
    multiplied by its (row, block) scale. High nibbles are W's even columns and low
    nibbles its odd ones, so x's tile is split into even and odd columns the same way,
    and a step is two dots: W[:, 0::2] @ x[:, 0::2].T + W[:, 1::2] @ x[:, 1::2].T.
  * The lookup (fp16 on a GPU, USE_ASM): the table lives in registers as 8 words, the low
    and the high bytes of its 16 fp16 entries, and PTX byte permutes (`prmt`) pick them
    by nibble: 16 prmt + 6 logic ops + 4 fp16x2 scale multiplies per 32-bit word of 8
    weights (`_nf4_lookup_asm`), no memory access. Elsewhere (fp32, Triton's CPU
    interpreter, which cannot run PTX) a gather from the table in memory, which stays in L1.
  * Column-major bytes: a K position's BLOCK_N rows are contiguous, loaded 16 bytes a
    thread straight into the layout the operand is built in.
  * Loads: with USE_ASM the byte tile is loaded in the loop and Triton pipelines it
    through shared memory (cp.async, PIPELINED). The gather path prefetches the next
    step's bytes into registers by hand instead; with the asm that costs ~3 instructions
    per 32-bit word to repack the loop-carried bytes, so it is slower there.
  * Split-K. Decode shapes have few output tiles (4096 / 128 = 32) for 100+ SMs, so
    SPLIT_K programs share a tile's K range. Each writes its fp32 partial to a workspace
    and bumps the tile's counter; the last to arrive sums the partials in order
    0..SPLIT_K-1 (deterministic) and resets the counter to 0 for the next call. One
    launch, nothing to zero beforehand, safe to capture in a CUDA graph.
Instructions (SASS of the main loop, H100/H200, 128x128 tile step): the gather costs ~8.5
per weight (64-bit table address, the gather, nibble unpacking); the prmt lookup ~4.6
(2 prmt, 0.6 logic, 0.5 multiply, the rest tile overhead). H200, decode shapes:
0.33-0.74 TB/s of NF4 before, 0.42-1.12 TB/s with the prmt lookup (bench/gpu_kernels.py
--nf4-variants); what is left is latency (synchronous wgmma, shared-memory round trip
of the operand), not the lookup.

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
prmt.b32 a, $7, $11, q;
prmt.b32 b, $15, $19, q;
prmt.b32 l, a, b, s;
prmt.b32 a, $23, $27, q;
prmt.b32 b, $31, $35, q;
prmt.b32 h, a, b, s;
prmt.b32 e0, l, h, 0x7351;
prmt.b32 o0, l, h, 0x6240;
shr.b32 q, q, 16;
shr.b32 s, s, 16;
prmt.b32 a, $7, $11, q;
prmt.b32 b, $15, $19, q;
prmt.b32 l, a, b, s;
prmt.b32 a, $23, $27, q;
prmt.b32 b, $31, $35, q;
prmt.b32 h, a, b, s;
prmt.b32 e1, l, h, 0x7351;
prmt.b32 o1, l, h, 0x6240;
mul.rn.f16x2 $0, e0, $5;
mul.rn.f16x2 $1, e1, $6;
mul.rn.f16x2 $2, o0, $5;
mul.rn.f16x2 $3, o1, $6;
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
def _nf4_lookup_asm(packed, scale, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3):
    """(code[packed >> 4] * scale, code[packed & 15] * scale) in fp16, with no memory access.

    4 bytes per asm instance (one 32-bit register, pack=4): a byte permute `prmt` picks
    bytes from an 8-byte table by the low 3 bits of 4 selector nibbles, so the low and
    high bytes of the 16 fp16 entries are looked up in entries 0-7 and 8-15 and chosen by
    each nibble's bit 3, then interleaved into fp16 pairs and scaled by fp16x2 multiplies:
    16 prmt, 6 logic ops and 4 multiplies for 8 weights.
    """
    return tl.inline_asm_elementwise(
        _NF4_LOOKUP_PTX,
        "=r,=r,=r,=r" + ",r" * 35,
        [packed, scale, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _step_mask(step, last_step, mask_n, offs_group, n_blocks, GROUPS: tl.constexpr):
    """(BLOCK_N, GROUPS, 1) mask of a step's bytes: real rows, blocks inside K, step in range."""
    in_k = (step * GROUPS + offs_group < n_blocks) & (step < last_step)
    return mask_n[:, None, None] & in_k[None, :, None]


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # (M, K), rows `stride_xm` apart
    packed_ptr,  # (N, K // 2) uint8, column-major: element (n, j) at j * N + n
    absmax_ptr,  # (N, K // BLOCKSIZE) fp32, column-major
    code_ptr,  # (16,) NF4 table in x's dtype
    out_ptr,  # (M, N), rows `stride_om` apart
    partial_ptr,  # (SPLIT_K, M, N) fp32 workspace, unused if SPLIT_K == 1
    counter_ptr,  # (>= cdiv(N, BLOCK_N),) int32, zero on entry and on exit
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_ASM: tl.constexpr = False,
    PIPELINED: tl.constexpr = False,
):
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE  # quantization blocks per step
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_group = tl.arange(0, GROUPS)
    offs_byte = tl.arange(0, HALF)
    mask_n = offs_n < N
    mask_m = offs_m < M

    n_steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(n_steps, SPLIT_K)
    first_step = pid_k * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, n_steps)

    # Tiles of a step are 3D, (rows, GROUPS blocks, elements of a block): one scale per
    # (row, block) broadcasts over the last axis without reshaping the weights.
    byte_in_step = offs_group[:, None] * HALF + offs_byte[None, :]  # (GROUPS, HALF)
    packed_tile = packed_ptr + byte_in_step[None, :, :] * N + offs_n[:, None, None]
    absmax_tile = absmax_ptr + offs_group[None, :] * N + offs_n[:, None]
    x_in_step = offs_group[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (GROUPS, BLOCKSIZE)
    x_tile = x_ptr + offs_m[:, None, None].to(tl.int64) * stride_xm + x_in_step[None, :, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out.T tile
    if USE_ASM:  # the fp16 table as byte planes, in registers for the whole kernel
        lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3 = _table_planes(code_ptr)
    # The packed bytes feed table lookups, and Triton only software-pipelines loads that
    # feed tl.dot: prefetch them one step ahead by hand, so their DRAM latency overlaps
    # the current step.
    n_blocks = K // BLOCKSIZE
    step_bytes = (BLOCK_K // 2) * N  # one step further along K in the column-major bytes
    if not PIPELINED:
        mask = _step_mask(first_step, last_step, mask_n, offs_group, n_blocks, GROUPS)
        next_packed = tl.load(packed_tile + first_step * step_bytes, mask=mask, other=0)
    for step in range(first_step, last_step):
        if PIPELINED:
            mask = _step_mask(step, last_step, mask_n, offs_group, n_blocks, GROUPS)
            packed = tl.load(packed_tile + step * step_bytes, mask=mask, other=0)
        else:
            packed = next_packed  # (BLOCK_N, GROUPS, HALF)
            mask = _step_mask(step + 1, last_step, mask_n, offs_group, n_blocks, GROUPS)
            next_packed = tl.load(packed_tile + (step + 1) * step_bytes, mask=mask, other=0)

        in_k = step * GROUPS + offs_group < n_blocks
        scale = tl.load(absmax_tile + step * GROUPS * N, mask=mask_n[:, None] & in_k[None, :], other=0.0)
        scale = scale.to(x_ptr.dtype.element_ty)[:, :, None]
        if USE_ASM:
            scale = tl.broadcast_to(scale, packed.shape)
            w_even, w_odd = _nf4_lookup_asm(packed, scale, lb0, lb1, lb2, lb3, hb0, hb1, hb2, hb3)
        else:
            w_even = tl.load(code_ptr + (packed >> 4)) * scale  # W[:, 0::2] of the step
            w_odd = tl.load(code_ptr + (packed & 0xF)) * scale  # W[:, 1::2]

        x_mask = mask_m[:, None, None] & in_k[None, :, None]
        x = tl.load(x_tile + step * BLOCK_K, mask=x_mask, other=0.0)  # (BLOCK_M, GROUPS, BLOCKSIZE)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, GROUPS, HALF, 2)))
        w_even = tl.reshape(w_even, (BLOCK_N, BLOCK_K // 2))
        w_odd = tl.reshape(w_odd, (BLOCK_N, BLOCK_K // 2))
        x_even = tl.reshape(x_even, (BLOCK_M, BLOCK_K // 2))
        x_odd = tl.reshape(x_odd, (BLOCK_M, BLOCK_K // 2))
        acc = tl.dot(w_even, tl.trans(x_even), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(w_odd, tl.trans(x_odd), acc, input_precision=DOT_PRECISION)

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
    packed_ptr,  # (N, K // 2) uint8, column-major
    absmax_ptr,  # (N, K // BLOCKSIZE) fp32, column-major
    code_ptr,  # (16,) fp32
    out_ptr,  # (N, K), row-major
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # byte columns
    mask = (offs_n < N)[:, None] & (offs_j < K // 2)[None, :]
    packed = tl.load(packed_ptr + offs_j[None, :] * N + offs_n[:, None], mask=mask, other=0)
    scale = tl.load(absmax_ptr + (offs_j // (BLOCKSIZE // 2))[None, :] * N + offs_n[:, None], mask=mask, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale  # fp32 products, as bitsandbytes computes them
    low = tl.load(code_ptr + (packed & 0xF)) * scale
    w = tl.interleave(high, low).to(out_ptr.dtype.element_ty)  # (BLOCK_N, 2 * BLOCK_J): W[n, 2j], W[n, 2j + 1]
    offs_k = tl.program_id(1) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J)
    out_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=out_mask)


def matmul_config(m: int, n: int, k: int, blocksize: int, sm_count: int) -> dict:
    """Tile sizes, split-K and launch options for an (m, k) x (n, k).T NF4 matmul.

    From sweeps on an H200 (`bench/gpu_kernels.py --sweep` and `--nf4-variants`), steps of
    128 along K, 4 warps:
      up to 16 rows   128-row weight tiles, split K towards ~6 programs per SM;
      17..128 rows    128-row tiles and no split when 64-row tiles alone give 2 programs per
                      SM (each program re-reads x, so fewer, taller tiles save L2 traffic
                      once the GPU is full anyway); else 64-row tiles (128-row ones when
                      K >= 2 N and that still gives 32+ tiles: the down projection) and
                      K split while the doubled
                      program count stays within 3 per SM (2 per SM plus a partial wave).
    Splits keep at least 4 steps of K each.
    """
    block_m = min(max(16, triton.next_power_of_2(m)), 128)
    if block_m == 16:
        block_n, target = 128, 6 * sm_count
    elif triton.cdiv(n, 64) >= 2 * sm_count:
        block_n, target = 128, 0
    else:
        tall = k >= 2 * n and triton.cdiv(n, 128) >= 32  # e.g. the down projection
        block_n, target = (128 if tall else 64), 3 * sm_count
    block_k = 128
    n_tiles = triton.cdiv(n, block_n)

    def more_programs_pay(split_k):
        if block_m == 16:
            return n_tiles * split_k < target
        return 2 * n_tiles * split_k <= target

    split_k = 1
    while m <= block_m and more_programs_pay(split_k) and k // block_k >= 8 * split_k and split_k < 16:
        split_k *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=3)


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
    """x (M, K) @ W.T -> (M, N) in x's dtype; `code_x` is the NF4 table in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    assert k == 2 * packed.shape[1] and k % blocksize == 0 and code_x.dtype == x.dtype
    assert packed.stride() == (1, n) and absmax.stride() == (1, n), "the Triton layout is column-major"
    assert packed.numel() < 2**31, "32-bit offsets"
    if x.stride(1) != 1:
        x = x.contiguous()
    config = dict(config or matmul_config(m, n, k, blocksize, multiprocessor_count(x.device)))
    use_asm = config.pop("USE_ASM", None)
    if use_asm is None:
        use_asm = asm_lookup_available(x)
    pipelined = config.pop("PIPELINED", use_asm)
    block_m, block_n, split_k = config["BLOCK_M"], config["BLOCK_N"], config["SPLIT_K"]
    assert config["BLOCK_K"] % blocksize == 0
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
        BLOCKSIZE=blocksize,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        USE_ASM=use_asm,
        PIPELINED=pipelined,
        **config,
    )
    return out


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, K) row-major weight in `dtype`, equal to `NF4Weight.dequantize`; `code` is the fp32 table."""
    n, k = packed.shape[0], packed.shape[1] * 2
    assert packed.stride() == (1, n) and absmax.stride() == (1, n), "the Triton layout is column-major"
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    block_n, block_j = 64, 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // 2, block_j))
    _nf4_dequantize_kernel[grid](
        packed, absmax, code, out, n, k, BLOCKSIZE=blocksize, BLOCK_N=block_n, BLOCK_J=block_j
    )
    return out
