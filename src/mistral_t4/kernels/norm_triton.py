"""Triton kernel for `norm.add_rms_norm` (reference and purpose: `norm.py`).

One program per row: s = x + delta rounded to x's dtype (stored: the new residual), the mean of
s^2 in fp32, n = s * rsqrt(mean + eps) rounded, h = weight * n rounded, as eager PyTorch (and
Hugging Face) round. On sm90, launched with programmatic dependent launch: it waits for the kernel
before it (`gdc_wait`) and at once lets the next one start its CTAs (`gdc_launch_dependents`):
the NF4 matmul after it loads its first weights and builds its table meanwhile. With X_READY (the caller's word
that x was written before the kernel launched just before this one: in a decoder layer that kernel gives delta,
x is older) it loads x and the weight before it waits, under the end of that kernel: a 32-row decode step on an
H100 3.614 / 3.606 -> 3.594 / 3.596 ms (bench/results/h100_2026-11-27_s14_attention_early_tile/norm_x_ready/).
"""

import torch
import triton
import triton.language as tl

from .attention_triton import gdc_launch_dependents, gdc_wait, pdl_options


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    delta_ptr,
    weight_ptr,
    sum_ptr,  # out: x + delta
    h_ptr,  # out: rms_norm(x + delta) * weight
    n_cols,
    stride_x,
    stride_delta,
    stride_sum,
    stride_h,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
    X_READY: tl.constexpr,  # x (and the weight) written before the kernel launched just before this one
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if PDL and not X_READY:
        gdc_wait()  # the kernel before this one has finished
        gdc_launch_dependents()  # the next matmul may start its CTAs: they wait for this grid
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if PDL and X_READY:
        gdc_wait()  # the kernel before this one (the matmul giving delta) has finished
        gdc_launch_dependents()
    delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
    total = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
    tl.store(sum_ptr + row * stride_sum + cols, total, mask=mask)
    s = total.to(tl.float32)
    mean = tl.sum(s * s, axis=0) / n_cols
    normed = (s * tl.math.div_rn(1.0, tl.sqrt_rn(mean + eps))).to(x.dtype)  # rounded as rsqrt, not an estimate
    h = (weight.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)


def num_warps(block: int) -> int:
    """Warps per row: one 16-byte vector of fp16 per thread (16 warps for Mistral-7B's 4096). Against 8 warps,
    a 32-row decode step 3.66 -> 3.56 ms, 64 rows 5.42 -> 5.39, 1 and 8 rows the same; 32 warps no better
    (H200, bench/experiments/step_launch.py, norm_launch_*h200_2026-11-27.json)."""
    return min(16, max(1, block // 256))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None, x_ready: bool = False):
    """(x + delta, rms_norm(x + delta) * weight) for x, delta (rows, hidden); into `out` if given. `x_ready`: x and
    the weight were written before the kernel launched just before this one (X_READY)."""
    assert x.ndim == 2 and delta.shape == x.shape and weight.shape == (x.shape[1],)
    assert x.stride(1) == 1 and delta.stride(1) == 1 and weight.is_contiguous()
    total, h = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
    assert total.shape == h.shape == x.shape and total.stride(1) == h.stride(1) == 1
    if x.shape[0] == 0:
        return total, h
    block = triton.next_power_of_2(x.shape[1])
    _add_rms_norm_kernel[(x.shape[0],)](
        x, delta, weight, total, h, x.shape[1], x.stride(0), delta.stride(0), total.stride(0), h.stride(0), eps,
        BLOCK=block, X_READY=x_ready, num_warps=num_warps(block), **pdl_options(x.device),
    )
    return total, h
