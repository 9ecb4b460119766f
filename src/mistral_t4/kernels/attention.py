"""Decode attention: one new query token per row against a static KV cache.

Shapes (the cache layout is fixed by the cache module):
    q:        (batch, n_heads, head_dim)                the token being decoded
    k_cache:  (max_batch, n_kv_heads, max_len, head_dim) rows 0..batch-1 are used
    v_cache:  same as k_cache
    lengths:  (batch,) int32, valid positions per row, counting the token being decoded
              (its K/V are already written). Idle slots have length 0 and give zeros.
    out:      (batch, n_heads, head_dim)

Grouped-query attention (Mistral-7B: 32 query heads, 8 KV heads): query head h reads KV
head h // group. Repeating K/V `group` times, as Hugging Face's SDPA path does when it
passes a mask, multiplies the bytes read by `group`; here a KV head is read once for its
whole group: q is viewed as (batch, n_kv_heads, group, head_dim) and multiplied with it.

A decode step reads each row's cache once and does `group` multiply-adds per element:
bandwidth-bound, like the NF4 matmul. The Triton kernel (`attention_triton.py`) reads only
the `length` valid positions of each row, not `max_len`, and splits long sequences across
programs (flash-decoding) when batch * n_kv_heads programs would leave SMs idle.

`decode_attention_rotary` (the decode step's path on GPUs) takes the new token's q, k and v
unrotated, from the qkv projection's output, with the rows' positions: it rotates q and k,
writes k and v to the cache at those positions and attends, in one launch instead of three
(rotary, two cache writes) before it; `decode_attention_rotary_reference` is the same in
plain PyTorch (`rotate`, an indexed write, `decode_attention_reference`).

Backends: `decode_attention_reference` (plain PyTorch: CPU, sm75, or forced; its two
batched matmuls run on cuBLAS) and `decode_attention` (the Triton kernel on CUDA as the
custom op `mistral_t4::decode_attention`, the reference elsewhere). The kernel uses fp16 or
fp32 only, no bf16; it compiles for sm75, but there tl.dot has no tensor cores and loads
are not pipelined, so `select_kernels` keeps the reference on a T4.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the last dim (halves layout, as HF). x: (..., head_dim); cos/sin broadcast."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch: scores over the whole cache, masked, softmax in fp32."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    k, v = k_cache[:batch], v_cache[:batch]  # (batch, n_kv_heads, max_len, head_dim)
    q = q.view(batch, n_kv_heads, group, head_dim)
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()  # (batch, n_kv_heads, group, max_len)

    positions = torch.arange(max_len, device=q.device)
    visible = positions < lengths[:, None]  # (batch, max_len)
    if sliding_window is not None:
        visible &= positions >= lengths[:, None] - sliding_window
    visible = visible[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible, probs, 0.0)  # a row that sees nothing gives NaN above, zeros here
    out = torch.matmul(probs.to(v.dtype), v)  # (batch, n_kv_heads, group, head_dim)
    return out.reshape(batch, n_heads, head_dim)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Same contract as the reference; the Triton kernel on CUDA."""
    if q.device.type != "cuda":
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale, sliding_window)
    return torch.ops.mistral_t4.decode_attention(q, k_cache, v_cache, lengths, scale, sliding_window)


@torch.library.custom_op("mistral_t4::decode_attention", mutates_args=())
def _decode_attention_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    from . import attention_triton

    return attention_triton.decode_attention(q, k_cache, v_cache, lengths, scale, sliding_window)


@_decode_attention_cuda.register_fake
def _(q, k_cache, v_cache, lengths, scale, sliding_window):
    return q.new_empty(q.shape)


def decode_attention_rotary_reference(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """qkv (batch, (n_heads + 2 n_kv_heads) head_dim) of the new tokens, positions (batch,): q and k
    rotated by `cos` / `sin` (max_len, head_dim) at each row's position, k and v written to the cache
    there, then attention over positions 0 .. position -> (batch, n_heads, head_dim)."""
    batch = qkv.shape[0]
    n_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q, k, v = q.reshape(batch, n_heads, head_dim), k.reshape(batch, n_kv_heads, head_dim), v.reshape(batch, n_kv_heads, head_dim)
    cos, sin = cos[positions][:, None], sin[positions][:, None]  # (batch, 1, head_dim)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    rows = torch.arange(batch, device=qkv.device)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v
    return decode_attention_reference(q, k_cache, v_cache, (positions + 1).to(torch.int32), scale, sliding_window)


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
) -> torch.Tensor:
    """Same contract as the reference; the Triton kernel on CUDA (one launch, and the merge of its splits)."""
    if qkv.device.type != "cuda":
        return decode_attention_rotary_reference(qkv, k_cache, v_cache, positions, cos, sin, n_heads, scale,
                                                 sliding_window)
    return torch.ops.mistral_t4.decode_attention_rotary(qkv, k_cache, v_cache, positions, cos, sin, n_heads, scale,
                                                        sliding_window)


@torch.library.custom_op("mistral_t4::decode_attention_rotary", mutates_args=("k_cache", "v_cache"))
def _decode_attention_rotary_cuda(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    from . import attention_triton

    return attention_triton.decode_attention_rotary(qkv, k_cache, v_cache, positions, cos, sin, n_heads, scale,
                                                    sliding_window)


@_decode_attention_rotary_cuda.register_fake
def _(qkv, k_cache, v_cache, positions, cos, sin, n_heads, scale, sliding_window):
    return qkv.new_empty(qkv.shape[0], n_heads, k_cache.shape[3])
