"""RMSNorm and the residual add before it: the plain PyTorch reference and one Triton kernel.

Each decoder layer of the decode step adds the attention's and then the MLP's output to the
residual stream and normalizes the sum for the next matmul: `add_rms_norm`. Compiled by inductor
that is one kernel already; `add_rms_norm_fused` is the same as a kernel of ours, on every GPU backend
(the T4's included: inductor has nothing to compile for it), so that on sm90 it can take part in the
chain of programmatic dependent launches (`kernels.early_launch`): it waits for the matmul before it
at its start and lets the next matmul start its CTAs at once, so that the next weights stream in
while it runs (`norm_triton.py`).
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as Hugging Face computes it: statistics in fp32, gain in the model dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next RMSNorm: (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


# RMSNorm split around a matmul, so that the CUDA NF4 kernels can do it in their epilogues (`nf4.nf4_linear_residual`,
# `nf4.nf4_linear_scaled`) and the decode step loses its norm kernels: rms_norm(s) @ W.T = r * ((s * weight) @ W.T)
# for each row's r = 1 / sqrt(mean(s^2) + eps). The matmul giving the residual's delta keeps the sum s, s * weight and
# the sums of s^2 per 16 columns; the next matmul takes s * weight as its input and scales its rows by r. The
# roundings differ from `rms_norm`'s (weight * fp16(s r) there, r applied to the fp32 sums here): within an fp16 ulp
# of the input, as any reordering.
SQ_GROUP = 16  # columns per partial sum of squares (the CUDA kernels' row groups)


def residual_norm_parts(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
    """(s = x + delta, s * weight, the sums of s^2 in fp32 over each 16 columns: (rows, hidden / 16))."""
    total = x + delta
    return (total, *norm_parts(total, weight))


def norm_parts(s: torch.Tensor, weight: torch.Tensor):
    """`residual_norm_parts` of s itself: (s * weight, the sums of s^2 per 16 columns)."""
    return s * weight, s.float().pow(2).unflatten(-1, (-1, SQ_GROUP)).sum(-1)


def rms_scales(sums: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row's r = 1 / sqrt(mean square + eps) (rows, 1) fp32 from `residual_norm_parts`' sums."""
    return 1.0 / torch.sqrt(sums.sum(-1, keepdim=True) / (sums.shape[-1] * SQ_GROUP) + eps)


def add_rms_norm_fused(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                       x_ready: bool = False):
    """`add_rms_norm` of (rows, hidden) fp16/fp32 CUDA tensors in one Triton kernel (a custom op, so that
    compiled graphs keep it as it is); the same roundings as eager PyTorch. `x_ready`: x was written before the
    kernel launched just before this one (the residual stream, delta the output of that kernel): the kernel then
    reads x before it waits for that one (`norm_triton`)."""
    return torch.ops.mistral_t4.add_rms_norm(x, delta, weight, eps, x_ready)


@torch.library.custom_op("mistral_t4::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, x_ready: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type != "cuda":
        return add_rms_norm(x, delta, weight, eps)
    from . import norm_triton

    return norm_triton.add_rms_norm(x, delta, weight, eps, x_ready=x_ready)


@_add_rms_norm_op.register_fake
def _(x, delta, weight, eps, x_ready=False):
    return torch.empty_like(x), torch.empty_like(x)
