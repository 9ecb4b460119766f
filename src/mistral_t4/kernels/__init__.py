"""Kernels of the decode step, each beside its plain-PyTorch reference.

    nf4.py        NF4Weight, nf4_linear, nf4_linear_reference   (kernels: nf4_triton.py, nf4_cuda.py);
                  nf4_swiglu: SiLU(gate) * up of the fused gate/up projection (on "cuda" in the matmul's epilogue)
    attention.py  decode_attention, decode_attention_reference  (Triton kernels: attention_triton.py);
                  decode_attention_rotary (+ _reference): rotary, cache write and attention in one launch
    norm.py       add_rms_norm (reference), add_rms_norm_fused (Triton kernel: norm_triton.py)
    prefill_triton.py  prefill's rotary on q and k and SiLU(gate) * up (references: attention.rotate, nf4.silu_mul),
                  taken with the add + RMSNorm kernel by `model.fused_ops(ours=True)` wherever the decode step takes ours

Which implementation runs is decided once, at load, from the device (`select_kernels`):
    CPU                          references
    sm75 (T4)                    references' cuBLAS matmuls for attention, bitsandbytes' fused
                                 4-bit GEMM for nf4_linear: on sm75 Triton's tl.dot has no
                                 tensor cores and no asynchronous copies to pipeline loads
                                 (both kernels compile there, untested on a T4); the add +
                                 RMSNorm and prefill's elementwise steps are our Triton kernels
                                 on every GPU backend (no tl.dot; compile tests for sm75)
    sm80+ (A100, L4, H100, H200) Triton for both; for an engine that decodes <= 64 rows per
                                 step (`decode_rows`: the chat, the 32-request benchmark;
                                 MISTRAL_T4_NF4_CUDA_ROWS sets 1..64), nf4_linear in CUDA
                                 (nf4_cuda.py, compiled by NVRTC) when it compiles there
                                 and a block may have the shared memory of its table and
                                 sums (127 KB where the window starts at 1 KB, as on the
                                 H200, 191 KB for the wide 32-row and the 64-row kernels: A100/H100/H200
                                 allow it; sm86/sm89 cards such as the L4 allow 99 KB and
                                 keep Triton)
    MISTRAL_T4_REFERENCE_KERNELS=1 forces the references, to compare or to debug;
    MISTRAL_T4_NF4_CUDA=0 keeps the Triton NF4 kernel at any batch;
    MISTRAL_T4_EARLY_LAUNCH=0 turns off programmatic dependent launch (`early_launch`).
`nf4_linear` follows the backend stored in its NF4Weight; for attention, call
`decode_attention` when the choice is "triton" and `decode_attention_reference` otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .attention import decode_attention, decode_attention_reference, decode_attention_rotary, decode_attention_rotary_reference
from .nf4 import NF4Weight, nf4_linear, nf4_linear_reference

__all__ = [
    "NF4Weight",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_rotary",
    "decode_attention_rotary_reference",
    "describe",
    "nf4_linear",
    "nf4_linear_reference",
    "select_kernels",
]

REFERENCE_ENV = "MISTRAL_T4_REFERENCE_KERNELS"
EARLY_LAUNCH_ENV = "MISTRAL_T4_EARLY_LAUNCH"
NF4_CUDA_ENV = "MISTRAL_T4_NF4_CUDA"
NF4_CUDA_ROWS_ENV = "MISTRAL_T4_NF4_CUDA_ROWS"

_DESCRIPTIONS = {
    ("nf4_linear", "triton"): "Triton NF4 GEMM, dequantized in registers",
    ("nf4_linear", "cuda"): "CUDA NF4 GEMM for <= 64 rows, table in shared memory, NVRTC",
    ("nf4_linear", "bnb"): "bitsandbytes gemm_4bit",
    ("nf4_linear", "reference"): "dequantize + F.linear",
    ("decode_attention", "triton"): "Triton flash-decoding, GQA, valid positions only, rotary + cache write fused",
    ("decode_attention", "reference"): "PyTorch matmul + softmax over the whole cache",
}


def select_kernels(device, force_reference: bool | None = None, decode_rows: int | None = None,
                   capability: tuple[int, int] | None = None) -> dict[str, str]:
    """Backend per kernel for `device`: {"nf4_linear": ..., "decode_attention": ...}.

    `decode_rows`: rows of a decode step (the engine's slots), when known; at most
    `cuda_rows()` selects the CUDA NF4 kernel on sm80+ (it compiles it to check).
    `capability`: choose as for a card of this compute capability instead of the device's, e.g.
    (7, 5): what a T4 takes, run on a bigger card to check that path (bench/gpu_check.py).
    """
    device = torch.device(device)
    if force_reference is None:
        force_reference = os.environ.get(REFERENCE_ENV, "0") == "1"
    if force_reference or device.type != "cuda":
        return {"nf4_linear": "reference", "decode_attention": "reference"}
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= (8, 0) and triton_available():
        from . import nf4_cuda

        small = decode_rows is not None and decode_rows <= cuda_rows()
        if small and os.environ.get(NF4_CUDA_ENV, "1") != "0" and nf4_cuda.available(device):
            return {"nf4_linear": "cuda", "decode_attention": "triton"}
        return {"nf4_linear": "triton", "decode_attention": "triton"}
    return {"nf4_linear": "bnb", "decode_attention": "reference"}


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (our kernels of every GPU path but bitsandbytes' are Triton or need it)."""
    return importlib.util.find_spec("triton") is not None


def cuda_rows() -> int:
    """Engines of at most this many slots take the CUDA NF4 kernel: `nf4_cuda.ENGINE_ROWS` (64),
    or MISTRAL_T4_NF4_CUDA_ROWS (1..nf4_cuda.MAX_ROWS; 8 gives 16- to 64-slot engines the Triton
    kernel, to compare). On an H200 the CUDA kernels beat Triton per layer at every size (77.2 vs
    117.6 us at 16 rows, 107.8 vs 135.8 at 32, 156.9 vs 169.4 at 64, bench/experiments/nf4_ranges.py) and the 32-request
    benchmark with them: 4.17 vs 4.98 ms per decode step, 6,252 vs 5,403 output tokens/s in one
    call (bench/results/h200_2026-11-26_s7_rows32/)."""
    from . import nf4_cuda

    value = os.environ.get(NF4_CUDA_ROWS_ENV)
    if value is None:
        return nf4_cuda.ENGINE_ROWS
    if not value.strip().isdigit() or not 1 <= int(value) <= nf4_cuda.MAX_ROWS:
        raise ValueError(f"{NF4_CUDA_ROWS_ENV}={value!r}: expected a number of rows from 1 to {nf4_cuda.MAX_ROWS}")
    return int(value)


def describe(choice: dict[str, str]) -> str:
    """One line for the load log, e.g. 'kernels: nf4_linear=triton (...), decode_attention=...'."""
    parts = [f"{name}={backend} ({_DESCRIPTIONS[name, backend]})" for name, backend in choice.items()]
    return "kernels: " + ", ".join(parts)


def early_launch(device) -> bool:
    """Whether kernels on `device` chain by programmatic dependent launch (sm90: a kernel's CTAs may
    start while the kernel before it finishes, and wait in the kernel for its results): the decode
    step's kernels, each of a layer following one of ours (`model.FastMistral`): the add + RMSNorm
    kernel, qkv, the decode attention and its merge, o, the add + RMSNorm kernel, gate/up with SiLU,
    down. MISTRAL_T4_EARLY_LAUNCH=0 launches them one after the other (to compare)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
            and os.environ.get(EARLY_LAUNCH_ENV, "1") != "0")


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere): how many programs it takes to fill the GPU."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
