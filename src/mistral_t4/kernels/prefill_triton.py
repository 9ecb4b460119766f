"""Triton kernels for prefill's elementwise steps between the matmuls (references: `attention.rotate`,
`nf4.silu_mul`; the residual add + RMSNorm is `norm_triton.py`'s kernel over all rows: `add_rms_norm_rows`).

Prefill runs eagerly (its shapes vary) and took these steps as inductor kernels compiled once with
dynamic shapes (`model.fused_ops`). On a 32 x 128-token prefill (H200) those spent 11.7 ms of 110 in
rotary alone (~0.2 TB/s: the transposing copy's index math over dynamic sizes) and 8.3 ms in SiLU * up
(1.4 TB/s). These kernels take one row (token) per program with the sizes known, and round where eager
PyTorch rounds:
  * `rotate_qk`: q and k of a token, all heads, straight from the qkv projection's output (any strides,
    head_dim contiguous): x * cos + rotate_half(x) * sin, each product and the sum rounded (`_rotate`, as
    the decode attention kernel does; launched without multiply-add contraction); the results in
    (n, T, heads, head_dim) order, returned as (n, heads, T, head_dim) views as SDPA and the cache take them.
  * `silu_mul`: SiLU(gate) * up of the fused gate/up output: silu in fp32 (Triton's exp, as inductor's kernel
    takes it; an IEEE division), rounded, times up, rounded.
"""

import torch
import triton
import triton.language as tl

from .attention_triton import _rotate
from .norm_triton import add_rms_norm


@triton.jit
def _rotate_heads(x_ptr, out_ptr, cos, sin, stride_h, heads, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < heads
    x = tl.load(x_ptr + h * stride_h + d, mask=mask, other=0.0)
    partner = tl.load(x_ptr + h * stride_h + (d + HEAD_DIM // 2) % HEAD_DIM, mask=mask, other=0.0)
    tl.store(out_ptr + h * HEAD_DIM + d, _rotate(x, partner, cos, sin, d < HEAD_DIM // 2), mask=mask)


@triton.jit
def _rotate_qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, length,
                      stride_qn, stride_qh, stride_qt, stride_kn, stride_kh, stride_kt, q_heads, k_heads,
                      Q_PAD: tl.constexpr, K_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)  # token t of sequence n: n * length + t
    n = row // length
    t = row % length
    d = tl.arange(0, HEAD_DIM)[None, :]
    cos = tl.load(cos_ptr + t * HEAD_DIM + d)
    sin = tl.load(sin_ptr + t * HEAD_DIM + d)
    _rotate_heads(q_ptr + n * stride_qn + t * stride_qt, q_out_ptr + row * q_heads * HEAD_DIM, cos, sin, stride_qh,
                  q_heads, Q_PAD, HEAD_DIM)
    _rotate_heads(k_ptr + n * stride_kn + t * stride_kt, k_out_ptr + row * k_heads * HEAD_DIM, cos, sin, stride_kh,
                  k_heads, K_PAD, HEAD_DIM)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`model.rotate_qk` for prefill: q (n, heads, T, head_dim), k (n, kv_heads, T, head_dim), any strides with
    head_dim contiguous; cos, sin (T, head_dim) -> rotated q, k, (n, heads, T, head_dim) views of new tensors."""
    n, q_heads, length, head_dim = q.shape
    k_heads = k.shape[1]
    assert k.shape == (n, k_heads, length, head_dim) and cos.shape == sin.shape == (length, head_dim)
    assert q.stride(3) == 1 and k.stride(3) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert head_dim == triton.next_power_of_2(head_dim) and cos.dtype == sin.dtype == q.dtype == k.dtype
    q_out = q.new_empty((n, length, q_heads, head_dim))
    k_out = k.new_empty((n, length, k_heads, head_dim))
    if n * length:
        _rotate_qk_kernel[(n * length,)](
            q, k, q_out, k_out, cos, sin, length, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), q_heads, k_heads, Q_PAD=triton.next_power_of_2(q_heads), K_PAD=triton.next_power_of_2(k_heads),
            HEAD_DIM=head_dim, num_warps=4,
            enable_fp_fusion=False,  # products rounded where eager PyTorch rounds them (see attention_triton)
        )
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, half, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < half
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + half + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`nf4.silu_mul` on a CUDA tensor (..., 2 * width), last dim contiguous -> (..., width)."""
    assert gate_up.stride(-1) == 1 and gate_up.shape[-1] % 2 == 0
    half = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    out = rows.new_empty((rows.shape[0], half))
    block = 1024
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(half, block))](
            rows, out, half, rows.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], half)


def add_rms_norm_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """`norm.add_rms_norm` of (..., hidden) CUDA tensors by the decode step's kernel (`norm_triton`), over all rows."""
    total, h = add_rms_norm(x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1]), weight, eps)
    return total.view(x.shape), h.view(x.shape)
