"""Triton decode attention over a static KV cache (reference and shapes: `attention.py`).

One program per (row, KV head, split). It loads the `group` query heads that share the KV
head once, then streams that head's valid cache positions in tiles of BLOCK_L:

    scores = q @ k_tile.T            (GROUP_PAD, BLOCK_L)
    online softmax: running max m, running sum l, rescale acc by exp(m_old - m_new)
    acc    = acc + p @ v_tile        (GROUP_PAD, head_dim)

Both products are `tl.dot`s on q padded with zero rows to GROUP_PAD >= 16 (Mistral's group
is 4): the wasted multiplies are free next to the bytes moved, and loads that feed tl.dot
are the ones Triton software-pipelines, which keeps enough cache reads in flight.

Flash-decoding: with few rows (batch 1: 8 programs for 100+ SMs) each program would stream
the whole sequence alone. Then the sequence is cut into NUM_SPLITS chunks, each program
writes its unnormalized acc with its m and l, and a second small kernel merges the chunks:
    out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,   M = max_s m_s.
The split count depends only on shapes (static under CUDA graphs), never on `lengths`.
A program whose chunk lies beyond its row's length, or before its sliding window, loops zero
times and writes empty statistics (m = -inf, l = 0), which the merge weighs by 0.
(Merging in the last program of each row and KV head instead, with a counter per pair, saved the
second launch but not time: batch 1 2.508 / 2.512 -> 2.516 / 2.515 ms per token, W32 the same;
H200, bench/results/h200_2026-11-27_s8_merge_in_kernel/; dropped.)

`decode_attention_rotary` (ROTARY): the same kernel also does what the decode step did in three
kernels before it: it reads q, k and v of the new token straight from the qkv projection's
output, applies the rotary embedding of the row's position to q and k (rounded as eager fp16
PyTorch rounds `x * cos + rotate_half(x) * sin`), and the program whose chunk holds that position
writes k and v to the cache and adds the position's term from registers after its loop, which
stops before it (so no program reads a cache entry written in the same launch). Launched
without multiply-add contraction, which otherwise left k one fp16 ulp off eager's in 16% of
elements; without it both paths leave the same cache bit for bit (H200, `bench/gpu_kernels.py`).
Measured (H200, bench/results/h200_2026-11-27_s8_rotary_attention/): a decode step's kernels
at 1 row 9 -> 5 per layer besides the matmuls (inductor's elementwise kernels 316 -> 192 us
per step, gaps 156 -> 87 us); batch 1 2.665 / 2.665 -> 2.512 / 2.526 ms per token, W32
6,307 / 6,345 -> 6,426 output tokens/s (before / after, one call each).

On sm90 both kernels are launched with programmatic dependent launch (`kernels.early_launch`,
Triton's `launch_pdl`): they wait (`gdc_wait`) for the kernel before them, and let
the one after them (the merge, the o projection's CUDA kernel, launched early too) start its CTAs
after the attention loop, so that it loads its weights while this finishes. With the o projection
early: batch 1 2.392 -> 2.352 ms per token (H200, bench/results/h200_2026-11-27_s9_swiglu_early/).
With ROTARY the attention kernel waits only after it has loaded its first tile of K and V: those
are cache entries of earlier steps at positions before the new token's (the positions come from
before the graph), and the kernel before it (the qkv projection) writes neither, so the loads
overlap that kernel's end; the loop then loads each tile one iteration ahead. Replayed decode step
on an H100: 32 rows 3.744 -> 3.641 ms, 1 row 2.253 -> 2.237, the logits equal bit for bit; tiles of
128 positions or 8 warps were slower (bench/results/h100_2026-11-27_s14_attention_early_tile/).
"""

import math

import torch
import triton
import triton.language as tl

from . import early_launch, multiprocessor_count

try:  # programmatic dependent launch from Triton kernels (Triton >= 3.3; used on sm90 only)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off (`pdl_options`), these are never traced
    gdc_launch_dependents = gdc_wait = None


def pdl_options(device) -> dict:
    """Launch options of our Triton kernels that take part in the chain of programmatic dependent
    launches (`kernels.early_launch`): their PDL constexpr, and Triton's `launch_pdl` when it is on."""
    pdl = gdc_wait is not None and early_launch(device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def _rotate(x, partner, cos, sin, first_half):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]): `partner` is x at
    (d + half) % head_dim; each product and the sum rounded to x's dtype, as eager PyTorch does."""
    rotated = tl.where(first_half, -partner, partner).to(tl.float32)
    a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
    b = (rotated * sin.to(tl.float32)).to(x.dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # (batch, n_heads, HEAD_DIM); ROTARY: the qkv projection's output (batch, (n_heads + 2 n_kv_heads) HEAD_DIM)
    k_ptr,  # (max_batch, n_kv_heads, max_len, HEAD_DIM)
    v_ptr,
    lengths_ptr,  # (batch,) int32; ROTARY: the positions of the new tokens (lengths - 1)
    out_ptr,  # (batch, n_heads, HEAD_DIM), written if NUM_SPLITS == 1
    split_acc_ptr,  # (batch, n_heads, NUM_SPLITS, HEAD_DIM) fp32, written if NUM_SPLITS > 1
    split_max_ptr,  # (batch, n_heads, NUM_SPLITS) fp32
    split_sum_ptr,  # (batch, n_heads, NUM_SPLITS) fp32
    cos_ptr,  # ROTARY: (max_len, HEAD_DIM) rotary tables in q's dtype
    sin_ptr,
    scale_log2e,  # softmax scale * log2(e): exp(x) = exp2(x * log2(e))
    window,  # attend to positions >= length - window (max_len when there is no window)
    chunk_len,  # positions per split, a multiple of BLOCK_L
    n_heads,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROTARY: tl.constexpr,
    PDL: tl.constexpr,  # launched early (programmatic dependent launch): wait for the kernel before it
):
    if PDL and not ROTARY:
        gdc_wait()  # lengths may come from the kernel before: everything waits
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ROTARY:
        position = tl.load(lengths_ptr + row).to(tl.int32)
        length = position + 1
    else:
        position = 0
        length = tl.load(lengths_ptr + row)
    begin = tl.maximum(length - window, 0)
    lo = tl.maximum(begin, split * chunk_len)
    hi = tl.minimum(length, (split + 1) * chunk_len)
    holds_new = False  # ROTARY: this program's chunk holds the new token's position
    if ROTARY:
        holds_new = (position >= lo) & (position < hi)
        hi = tl.where(holds_new, position, hi)  # the loop stops before it: its term comes from registers

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_l = tl.arange(0, BLOCK_L)
    k_rows = k_ptr + row.to(tl.int64) * stride_kb + kv_head * stride_kh + offs_d[None, :]
    v_rows = v_ptr + row.to(tl.int64) * stride_vb + kv_head * stride_vh + offs_d[None, :]
    # the first tile, loaded before the wait with ROTARY: positions before the new token's, written by earlier
    # steps (the positions come from before the graph), so the loads overlap the end of the qkv projection
    positions = lo + offs_l
    k_next = tl.load(k_rows + positions[:, None] * stride_kl, mask=(positions < hi)[:, None], other=0.0)
    v_next = tl.load(v_rows + positions[:, None] * stride_vl, mask=(positions < hi)[:, None], other=0.0)
    if PDL and ROTARY:
        gdc_wait()  # the qkv projection's output (and every earlier write) is visible from here

    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    q_row = q_ptr + row * stride_qb
    q = tl.load(q_row + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    if ROTARY:
        partner = (offs_d + HEAD_DIM // 2) % HEAD_DIM
        first_half = offs_d < HEAD_DIM // 2
        cos = tl.load(cos_ptr + position * HEAD_DIM + offs_d)
        sin = tl.load(sin_ptr + position * HEAD_DIM + offs_d)
        q_partner = tl.load(q_row + heads[:, None] * stride_qh + partner[None, :], mask=mask_g[:, None], other=0.0)
        q = _rotate(q, q_partner, cos[None, :], sin[None, :], first_half[None, :])
        k_at = q_row + (n_heads + kv_head) * HEAD_DIM
        v_at = q_row + (n_heads + tl.num_programs(1) + kv_head) * HEAD_DIM
        k_new = _rotate(tl.load(k_at + offs_d), tl.load(k_at + partner), cos, sin, first_half)  # (HEAD_DIM,)
        v_new = tl.load(v_at + offs_d)
        new_mask = (offs_d < HEAD_DIM) & holds_new
        tl.store(k_rows + position * stride_kl, k_new[None, :].to(k_ptr.dtype.element_ty), mask=new_mask[None, :])
        tl.store(v_rows + position * stride_vl, v_new[None, :].to(v_ptr.dtype.element_ty), mask=new_mask[None, :])
    running_max = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_L):
        k, v = k_next, v_next  # (BLOCK_L, HEAD_DIM): this tile, loaded one iteration ahead
        ahead = start + BLOCK_L + offs_l
        k_next = tl.load(k_rows + ahead[:, None] * stride_kl, mask=(ahead < hi)[:, None], other=0.0)
        v_next = tl.load(v_rows + ahead[:, None] * stride_vl, mask=(ahead < hi)[:, None], other=0.0)
        valid = start + offs_l < hi
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # (GROUP_PAD, BLOCK_L)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # finite: positions[0] is valid
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        running_max = new_max
    if ROTARY:
        if holds_new:  # the new token's term, as one more position of the loop
            score = tl.sum(q.to(tl.float32) * k_new.to(q.dtype).to(tl.float32)[None, :], axis=1) * scale_log2e
            new_max = tl.maximum(running_max, score)
            rescale = tl.exp2(running_max - new_max)
            p = tl.exp2(score - new_max)
            running_sum = running_sum * rescale + p
            acc = acc * rescale[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            running_max = new_max
    if PDL:
        gdc_launch_dependents()  # the merge or the o projection may start its CTAs (they wait for this grid)

    if NUM_SPLITS == 1:
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]  # no positions: acc is 0
        out_ptrs = out_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
    else:
        slots = (row * n_heads + heads) * NUM_SPLITS + split  # (GROUP_PAD,)
        tl.store(split_acc_ptr + slots[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None])
        tl.store(split_max_ptr + slots, running_max, mask=mask_g)
        tl.store(split_sum_ptr + slots, running_sum, mask=mask_g)


@triton.jit
def _combine_splits_kernel(
    split_acc_ptr,  # (batch, n_heads, NUM_SPLITS, HEAD_DIM) fp32
    split_max_ptr,  # (batch, n_heads, NUM_SPLITS) fp32
    split_sum_ptr,  # (batch, n_heads, NUM_SPLITS) fp32
    out_ptr,  # (batch, n_heads, HEAD_DIM)
    n_heads,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,  # as in _decode_attention_kernel
):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_s = offs_s < NUM_SPLITS
    slots = (row * n_heads + head) * NUM_SPLITS + offs_s
    split_max = tl.load(split_max_ptr + slots, mask=mask_s, other=float("-inf"))
    split_sum = tl.load(split_sum_ptr + slots, mask=mask_s, other=0.0)
    split_acc = tl.load(split_acc_ptr + slots[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    top = tl.max(split_max, axis=0)
    top = tl.where(top > float("-inf"), top, 0.0)  # every split empty: all weights exp2(-inf) = 0
    weight = tl.exp2(split_max - top)  # (SPLITS_PAD,)
    total = tl.sum(weight * split_sum, axis=0)
    acc = tl.sum(weight[:, None] * split_acc, axis=0)  # (HEAD_DIM,)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def default_num_splits(programs: int, max_len: int, sm_count: int) -> int:
    """One split when rows x KV heads give every SM a program; else about four programs per SM, in
    chunks of at least 64 positions, at most 32 splits.

    H100, Mistral heads (.probe sweep, kernel time per call): batch 1 over a 512-position cache
    9.4 -> 6.9 us (2 -> 8 splits), over 4096 13.0 -> 11.0 us (16 -> 32); batch 4 over 2048
    13.4 -> 11.6 (8 -> 17); batch 32 over 512 25.7 -> 24.0 (2 -> 1: every split costs there)."""
    if programs >= sm_count:
        return 1
    return max(1, min(triton.cdiv(4 * sm_count, programs), triton.cdiv(max_len, 64), 32))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    **tiles,
) -> torch.Tensor:
    """q (batch, n_heads, head_dim) -> (batch, n_heads, head_dim); see `attention.py`. `tiles`: block_len,
    num_warps, num_stages (`_launch`'s defaults otherwise)."""
    assert q.stride(2) == 1
    return _launch(q, q.shape[1], q.stride(0), q.stride(1), k_cache, v_cache, lengths, None, None, scale,
                   sliding_window, out, num_splits, **tiles)


def decode_attention_rotary(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    **tiles,
) -> torch.Tensor:
    """qkv (batch, (n_heads + 2 n_kv_heads) head_dim), positions (batch,) -> (batch, n_heads, head_dim),
    and the new tokens' rotated keys and values written to the cache at their positions; see `attention.py`.
    `tiles` as for `decode_attention`."""
    head_dim, n_kv_heads = k_cache.shape[3], k_cache.shape[1]
    assert qkv.dim() == 2 and qkv.shape[1] == (n_heads + 2 * n_kv_heads) * head_dim and qkv.stride(1) == 1
    assert cos.shape == sin.shape == (k_cache.shape[2], head_dim) and cos.is_contiguous() and sin.is_contiguous()
    assert cos.dtype == sin.dtype == qkv.dtype and positions.shape == (qkv.shape[0],)
    return _launch(qkv, n_heads, qkv.stride(0), head_dim, k_cache, v_cache, positions, cos, sin, scale,
                   sliding_window, out, num_splits, **tiles)


def _launch(q, n_heads, stride_qb, stride_qh, k_cache, v_cache, lengths, cos, sin, scale, sliding_window, out,
            num_splits=None, block_len=64, num_warps=4, num_stages=2):
    """The attention kernel (ROTARY when cos / sin are given: q is the qkv output, lengths the positions)
    and, with splits, the merge."""
    batch, head_dim = q.shape[0], k_cache.shape[3]
    n_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    assert n_heads == group * n_kv_heads and batch <= k_cache.shape[0]
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    if num_splits is None:
        num_splits = default_num_splits(batch * n_kv_heads, max_len, multiprocessor_count(q.device))
    chunk_len = triton.cdiv(triton.cdiv(max_len, num_splits), block_len) * block_len
    if out is None:
        out = q.new_empty((batch, n_heads, head_dim))
    if num_splits > 1:
        split_acc = torch.empty((batch, n_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        split_max = torch.empty((batch, n_heads, num_splits), dtype=torch.float32, device=q.device)
        split_sum = torch.empty((batch, n_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        split_acc = split_max = split_sum = out  # not touched
    rotary = cos is not None
    chained = pdl_options(q.device)  # sm90: chained to the kernels before and after
    _decode_attention_kernel[(batch, n_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        lengths,
        out,
        split_acc,
        split_max,
        split_sum,
        cos if rotary else out,  # not touched without ROTARY
        sin if rotary else out,
        scale * math.log2(math.e),
        sliding_window if sliding_window is not None else max_len,
        chunk_len,
        n_heads,
        stride_qb,
        stride_qh,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_L=block_len,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROTARY=rotary,
        num_warps=num_warps,
        num_stages=num_stages,
        # no multiply-add contraction: with it the rotary products were not rounded where eager PyTorch rounds
        # them (k one fp16 ulp off in 16% of elements, H200); without it the cache holds eager's values exactly
        enable_fp_fusion=not rotary,
        **chained,
    )
    if num_splits > 1:
        _combine_splits_kernel[(batch, n_heads)](
            split_acc,
            split_max,
            split_sum,
            out,
            n_heads,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            **chained,
        )
    return out
