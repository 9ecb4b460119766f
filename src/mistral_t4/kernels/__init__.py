"""Kernels of the decode step, each beside its plain-PyTorch reference.

    nf4.py        NF4Weight, nf4_linear, nf4_linear_reference   (kernels: nf4_triton.py, nf4_cuda.py);
                  nf4_swiglu: SiLU(gate) * up of the fused gate/up projection (on "cuda" in the matmul's epilogue)
    attention.py  decode_attention, decode_attention_reference  (Triton kernels: attention_triton.py);
                  decode_attention_rotary (+ _reference): rotary, cache write and attention in one launch
    norm.py       add_rms_norm (reference), add_rms_norm_fused (Triton kernel: norm_triton.py)
    prefill_triton.py  prefill's rotary on q and k and SiLU(gate) * up (references: attention.rotate, nf4.silu_mul),
                  taken with the add + RMSNorm kernel by `model.fused_ops(ours=True)` wherever the decode step takes ours
    greedy_triton.py   after a greedy decode step: argmax, the next tokens and positions in one launch (reference:
                  sampling.greedy_advance_reference), taken by the engine wherever the decode step takes ours

Which implementation runs is decided once, at load, from the device (`select_kernels`):
    CPU                          references
    sm75 (T4)                    references' cuBLAS matmuls for attention; for nf4_linear
                                 bitsandbytes' 4-bit GEMM or, for an engine of <= 64 slots,
                                 our CUDA kernel (its sm75 form: m16n8k8 MMAs, the table
                                 alone in a 64 KB block, one K range per CTA) where it is
                                 faster on this card at that batch (`nf4_race`, timed at
                                 load and printed). Not Triton: on sm75 its tl.dot has no
                                 tensor cores and no asynchronous copies. The add +
                                 RMSNorm and prefill's elementwise steps are our Triton kernels
                                 on every GPU backend (no tl.dot; compile tests for sm75).
                                 No T4 was available to us: sm75 code is compiled in tests
                                 and run on an H200 as PTX (MISTRAL_T4_NF4_CUDA_ARCH=compute_75).
                                 (An sm80+ card without Triton chooses the same way.)
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
    MISTRAL_T4_NF4_CUDA=0 keeps the Triton NF4 kernel at any batch (bitsandbytes' on sm75);
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
NORMS_IN_MATMULS_ENV = "MISTRAL_T4_NORMS_IN_MATMULS"  # "0": the decode step's own RMSNorm kernels (to compare)
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


# (N, K) of a Mistral-7B layer's NF4 matmuls: q/k/v, o, gate/up, down (`nf4_shapes`)
MISTRAL_7B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def nf4_shapes(config) -> tuple[tuple[int, int], ...]:
    """(N, K) of one layer's fused projections for a Mistral `config`: q/k/v, o, gate/up, down."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return (((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden),
            (hidden, inter))


def select_kernels(device, force_reference: bool | None = None, decode_rows: int | None = None,
                   capability: tuple[int, int] | None = None,
                   shapes: tuple[tuple[int, int], ...] = MISTRAL_7B_SHAPES) -> dict[str, str]:
    """Backend per kernel for `device`: {"nf4_linear": ..., "decode_attention": ...}.

    `decode_rows`: rows of a decode step (the engine's slots), when known; at most
    `cuda_rows()` selects the CUDA NF4 kernel on sm80+ (it compiles it to check), and on sm75 (T4)
    where it beats bitsandbytes' `gemm_4bit` on this card at those rows for one layer's `shapes`
    (`nf4_race`, timed here on random weights; a T4's speed was never measured by us).
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
    from . import nf4_cuda

    # the CUDA kernel is a candidate (compiled to check only then)
    small = decode_rows is not None and decode_rows <= cuda_rows() and os.environ.get(NF4_CUDA_ENV, "1") != "0"
    if tuple(capability) >= (8, 0) and triton_available():
        if small and nf4_cuda.available(device):
            return {"nf4_linear": "cuda", "decode_attention": "triton"}
        return {"nf4_linear": "triton", "decode_attention": "triton"}
    nf4 = "bnb"
    if small and nf4_cuda.available(device):
        race = nf4_race(device, decode_rows, tuple(shapes))
        nf4 = "cuda" if race["cuda"] < race["bnb"] else "bnb"
    return {"nf4_linear": nf4, "decode_attention": "reference"}


_RACES: dict[tuple, dict[str, float]] = {}


def nf4_race(device, rows: int, shapes: tuple[tuple[int, int], ...]) -> dict[str, float | str]:
    """Milliseconds of one layer's NF4 matmuls (`shapes`, x of `rows` rows) with our CUDA kernel and with
    bitsandbytes' `gemm_4bit` on `device`: {"cuda": ms, "bnb": ms}, on random weights (the time does not depend
    on the values). Each backend's calls are captured in a CUDA graph, as the decode step runs them (launched
    from Python one by one, our kernels' ctypes launches would be timed instead), replayed after a warm-up;
    the best of 5. A backend that fails here (bitsandbytes missing, a kernel error) gets inf and its error
    ("cuda_error"), so it is not chosen and loading goes on. Cached per (device, rows, shapes); `races()` lists them."""
    device = torch.device(device)
    key = (str(device), rows, shapes)
    if key not in _RACES:
        from . import nf4_cuda
        from .nf4 import NF4Weight, _tile_counters

        generator = torch.Generator(device=device).manual_seed(0)
        weights = {backend: [] for backend in ("cuda", "bnb")}
        for n, k in shapes:
            packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=generator)
            absmax = torch.rand(n, k // nf4_cuda.BLOCKSIZE, device=device, generator=generator) + 0.5
            code = torch.linspace(-1, 1, 16, device=device)
            for backend in weights:  # (the "cuda" layout's scales are fp16)
                scales = absmax.half() if backend == "cuda" else absmax
                weights[backend].append(NF4Weight(packed, scales, code, code.half(), _tile_counters(n, device),
                                                  nf4_cuda.BLOCKSIZE, backend))
        xs = {k: torch.randn(rows, k, dtype=torch.float16, device=device, generator=generator) for _, k in shapes}
        times = {}
        for backend, ws in weights.items():
            try:
                times[backend] = round(_graph_time_ms(device, ws, xs), 4)
            except Exception as error:  # noqa: BLE001 - a backend that fails its race is not chosen
                times[backend] = float("inf")
                times[f"{backend}_error"] = f"{type(error).__name__}: {error}"[:300]
        _RACES[key] = times
    return _RACES[key]


def _graph_time_ms(device: torch.device, ws: list, xs: dict[int, torch.Tensor]) -> float:
    """`nf4_linear` over the weights `ws` (x from `xs` by in_features) captured in a CUDA graph: the best of 5
    replays after one call each outside the capture (compiles, allocates) and one replay."""
    from .nf4 import nf4_linear

    if ws[0].backend == "bnb":
        importlib.import_module("bitsandbytes")  # registers torch.ops.bitsandbytes
    with torch.cuda.device(device):
        for w in ws:
            nf4_linear(xs[w.in_features], w)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in ws:
                nf4_linear(xs[w.in_features], w)
        best = float("inf")
        for repeat in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if repeat:  # the first is the warm-up
                best = min(best, start.elapsed_time(end))
        return best


def races() -> dict[str, dict[str, float | str | None]]:
    """The `nf4_race` results of this process, e.g. {"cuda:0, 32 rows": {"cuda": 1.2, "bnb": 3.4}} (a failed
    backend's time as None, for JSON)."""
    return {f"{device}, {rows} rows": {name: None if value == float("inf") else value for name, value in times.items()}
            for (device, rows, _), times in _RACES.items()}


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


def norms_in_matmuls(rows: int) -> bool:
    """Whether a decode step of `rows` rows on the CUDA NF4 kernels does its RMSNorms in their epilogues
    (`model.FastMistral`): up to `nf4_cuda.NORM_ROWS` (16), the kernels with those epilogues, unless
    MISTRAL_T4_NORMS_IN_MATMULS=0 (the step's own add + RMSNorm kernels, to compare).
    A replayed step against the package before, on an H200 (bench/results/h200_2026-11-27_s13_norms_in_matmuls/):
    1 row 2.108 -> 2.030 ms, 16 rows 2.605 -> 2.570. At 32 rows it was slower (4.02 -> 4.13, against a build whose
    plain kernels were slower too): without the norm kernel between them, a matmul's CTAs start only as the previous
    matmul's leave (one CTA per SM), and their table build and first weight loads wait in the open instead of under
    the norm kernel; at 32 rows that costs more than the norm kernels did.
    """
    from . import nf4_cuda

    return os.environ.get(NORMS_IN_MATMULS_ENV, "1") != "0" and rows <= nf4_cuda.NORM_ROWS


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere): how many programs it takes to fill the GPU."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
