"""NF4 weights and the NF4 linear layer: y = x @ W.T with W stored in 4 bits.

NF4 ("NormalFloat 4", from QLoRA) stores each weight as a 4-bit index into a fixed table
of 16 values (quantiles of a normal distribution, in [-1, 1]), plus one fp32 scale per
block of 64 consecutive weights of a row (the block's absolute maximum, "absmax"):

    W[n, k] = code[q[n, k]] * absmax[n, k // 64]

That is 4 + 32/64 = 4.5 bits per weight instead of 16. Double quantization (bitsandbytes'
`compress_statistics`) stores absmax itself in 8 bits; we decode it once, at load, back
to fp32 (fp16 for the "cuda" kernels, whose stream of bytes is their limit at a few rows:
`nf4_cuda.to_fragments`): 8 bits would save 3% more of the bytes but cost a second table
lookup per block.

Decode is bandwidth-bound: at batch 32 each weight is read once per step and used for 32
multiply-adds, far below what the tensor cores could do with it. So the fast kernel must
read the 4-bit data, not a dequantized fp16 copy (4x the bytes), and turn it into fp16 in
registers right before the matrix multiply. Prefill (thousands of rows) is compute-bound
instead, and there dequantizing to fp16 once and calling cuBLAS is the better deal.

Layout: bitsandbytes' own indexing (the "triton" backend reorders the bytes, see below).
    packed: (out_features, in_features // 2) uint8. Byte j of row n holds W[n, 2j] in its
            high nibble and W[n, 2j + 1] in its low nibble.
    absmax: (out_features, in_features // blocksize) fp32 ("cuda": fp16, rounded once at load).
A block never straddles two rows because in_features is a multiple of the blocksize
(true for every Mistral projection), so concatenating weights along out_features (fused
q/k/v, fused gate/up) is concatenating rows.
Byte order: bitsandbytes' own (its buffer itself, shared, no copy) for "bnb" and
"reference". For "triton" a copy made once at load in the "halves" order of
`nf4_triton.to_halves`: each step of two blocks along K keeps one block in the high
nibbles and the next in the low ones, so a kernel tile needs one scale per row per half
and plain contiguous slices of x (bitsandbytes' even/odd pairing costs a split of every
tile). For "cuda" a copy in the "fragment" order of `nf4_cuda.to_fragments` (16-row
groups whose bytes are the tensor-core registers of each lane; scales in group order).
`dequantize` and `concat` give the same results for every backend ("cuda": those of its fp16 scales).

Backends (chosen once at load by `kernels.select_kernels`, stored in `NF4Weight.backend`):
    "triton"    sm80+: `nf4_triton.nf4_matmul` (dequantize in registers + tensor cores) for
                small batches, `nf4_triton.nf4_dequantize` + cuBLAS for large ones.
    "cuda"      sm80+ when an engine decodes <= 64 rows (chat, the 32-request benchmark;
                `kernels.cuda_rows`): `nf4_cuda.nf4_matmul` up to 64 rows (NVRTC; table
                lookups from shared memory straight into mma.sync registers; 1.5-1.7x the
                Triton kernel per layer at 1-16 rows, ~1.25x at 32, 1.08x at 64),
                `nf4_cuda.nf4_dequantize` + cuBLAS above 64 rows.
                Weights whose shape it cannot take (rows % 16, blocksize != 64), or whose block
                maxima fp16 cannot hold (its scales are fp16), stay "triton".
    "bnb"       sm75 (T4): bitsandbytes' fused 4-bit GEMM, `torch.ops.bitsandbytes.gemm_4bit`.
                Triton's `tl.dot` has no tensor cores on sm75; bitsandbytes' kernel does.
    "reference" CPU, or when forced: dequantize (bitsandbytes' kernel, tested equal to the plain
                PyTorch `NF4Weight.dequantize_plain`) + F.linear.
`nf4_swiglu` is SiLU(gate) * up of the fused gate/up projection: on "cuda" one kernel (the
matmul's epilogue does the rest), elsewhere `silu_mul` of `nf4_linear`.
`nf4_linear_residual` and `nf4_linear_scaled` carry the RMSNorm between two matmuls
(`norm.residual_norm_parts`, `norm.rms_scales`): on "cuda" in the kernels' epilogues, elsewhere
the same in PyTorch.
The CUDA paths are `torch.library` custom ops with fake implementations, so
`torch.compile(fullgraph=True, mode="reduce-overhead")` captures them in a CUDA graph.
"""

from __future__ import annotations

import dataclasses

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

# Above this many rows dequantize-once + cuBLAS catches up with the fused kernel (H200:
# fused 0-20% faster at 64 rows, about even at 128).
FUSED_MAX_ROWS = 64


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A (out_features, in_features) weight in NF4, ready for `nf4_linear`."""

    packed: torch.Tensor  # (out_features, in_features // 2) uint8, two 4-bit indices per byte ("triton": halves order)
    absmax: torch.Tensor  # (out_features, in_features // blocksize) fp32, one scale per block ("cuda": fp16)
    code: torch.Tensor  # (16,) fp32, the NF4 table
    code_fp16: torch.Tensor  # (16,) fp16, the same table for the fp16 kernel (looked up per weight)
    tile_counters: torch.Tensor  # (cdiv(out_features, 16),) int32, zero between calls: split-K bookkeeping
    blocksize: int
    backend: str = "reference"

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.absmax.shape[1] * self.blocksize

    @property
    def nbytes(self) -> int:
        """Bytes a matmul must read: the 4-bit data and the scales."""
        return self.out_features * self.in_features // 2 + self.absmax.nbytes

    @classmethod
    def from_bnb(cls, param, backend: str | None = None) -> NF4Weight:
        """From the `.weight` (a `Params4bit`) of a `bnb.nn.Linear4bit`; "bnb"/"reference" share its data."""
        state = param.quant_state
        assert state is not None, "the Params4bit is not quantized yet (move it to a device first)"
        assert state.quant_type == "nf4", f"expected NF4 weights, got {state.quant_type}"
        out_features, in_features = state.shape
        assert in_features % state.blocksize == 0, (
            f"in_features={in_features} is not a multiple of the blocksize {state.blocksize}"
        )
        if getattr(state, "packing_format_for_cpu", False):
            packed, absmax = _undo_cpu_packing(param.data, state)
        else:
            packed = param.data.view(torch.uint8).view(out_features, in_features // 2)
            absmax = state.absmax
            if state.nested:  # double quantization: 8-bit absmax, decoded exactly as bitsandbytes does
                absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            absmax = absmax.float().view(out_features, in_features // state.blocksize)
        if backend is None:
            from . import select_kernels

            backend = select_kernels(packed.device)["nf4_linear"]
        packed, absmax, backend = _arrange(packed.contiguous(), absmax.contiguous(), state.blocksize, backend)
        code = state.code.float().to(packed.device)
        counters = _tile_counters(out_features, packed.device)
        return cls(packed, absmax, code, code.half(), counters, state.blocksize, backend)

    @classmethod
    def concat(cls, weights: list[NF4Weight]) -> NF4Weight:
        """Stack weights along out_features: one GEMM for q/k/v (or gate/up) instead of three."""
        first = weights[0]
        for w in weights[1:]:
            assert w.in_features == first.in_features, "concat needs equal in_features"
            assert w.blocksize == first.blocksize
            assert torch.equal(w.code, first.code), "concat needs the same 4-bit code table"
        if all(w.backend == first.backend for w in weights):
            packed = torch.cat([w.packed for w in weights])  # row by row ("cuda": whole 16-row groups)
            absmax = torch.cat([w.absmax for w in weights])
        else:  # a part fell back from "cuda" (its shape): one layout for all, from bitsandbytes' order
            layouts = [w.bnb_layout() for w in weights]
            packed = torch.cat([p for p, _ in layouts])
            absmax = torch.cat([a for _, a in layouts])
            packed, absmax, backend = _arrange(packed, absmax, first.blocksize, "triton")
            first = dataclasses.replace(first, backend=backend)
        counters = _tile_counters(packed.shape[0], packed.device)
        return dataclasses.replace(first, packed=packed, absmax=absmax, tile_counters=counters)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) tensor, equal to bitsandbytes' `dequantize_4bit`.

        Runs bitsandbytes' own dequantize kernel (C++ on CPU, CUDA on GPUs; 13x faster than
        `dequantize_plain` on a CPU, and it is what the CPU engine spends a decode step on),
        with `dequantize_plain` as the plain PyTorch definition it is tested against.
        """
        packed, absmax = self.bnb_layout()
        w = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed.reshape(-1, 1), absmax.reshape(-1), self.blocksize, "nf4",
            [self.out_features, self.in_features], torch.float32,
        )
        return w.to(dtype)

    def dequantize_plain(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`dequantize` in plain PyTorch: table lookup, then one fp32 scale per block."""
        # A byte indexes the 256 possible (high nibble, low nibble) pairs of table values.
        pairs = torch.stack(torch.meshgrid(self.code, self.code, indexing="ij"), dim=-1).view(256, 2)
        packed, absmax = self.bnb_layout()
        values = pairs[packed.long()]  # (out, in // 2, 2): W / absmax, in row order
        blocks = values.reshape(self.out_features, -1, self.blocksize)  # (out, in // blocksize, blocksize)
        w = blocks * absmax[:, :, None]  # fp32, as bitsandbytes computes it
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def bnb_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed, absmax) in bitsandbytes' order: (out_features, in_features // 2) bytes, row-major fp32 scales."""
        if self.backend == "triton":
            from .nf4_triton import from_halves

            return from_halves(self.packed, self.blocksize, self.in_features), self.absmax
        if self.backend == "cuda":
            from .nf4_cuda import from_fragments

            return from_fragments(self.packed, self.absmax)
        return self.packed, self.absmax

    def bnb_packed(self) -> torch.Tensor:
        """The 4-bit data in bitsandbytes' byte order."""
        return self.bnb_layout()[0]

    def row_absmax(self) -> torch.Tensor:
        """The (out_features, in_features // blocksize) fp32 scales in row order."""
        return self.bnb_layout()[1]

    def to(self, device) -> NF4Weight:
        return dataclasses.replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            code_fp16=self.code_fp16.to(device),
            tile_counters=self.tile_counters.to(device),
        )

    def lookup_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The NF4 table in the kernel's compute dtype (a conversion per call would be a kernel launch)."""
        if dtype == torch.float16:
            return self.code_fp16
        return self.code.to(dtype)


def _arrange(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, backend: str):
    """bitsandbytes' (N, K/2) bytes + row-major fp32 scales -> the backend's layout (and the backend:
    "cuda" becomes "triton" for a shape the CUDA kernel does not take, or scales that fp16 cannot hold)."""
    if backend == "cuda":
        from . import nf4_cuda

        fits = bool(absmax.max() <= torch.finfo(torch.float16).max)  # its scales are fp16 (no NaN either)
        if fits and nf4_cuda.supports(packed.shape[0], packed.shape[1] * 2, blocksize):
            return *nf4_cuda.to_fragments(packed, absmax), backend
        backend = "triton"
    if backend == "triton":
        from .nf4_triton import to_halves

        return to_halves(packed, blocksize), absmax, backend
    return packed, absmax, backend


def _tile_counters(out_features: int, device) -> torch.Tensor:
    return torch.zeros(-(-out_features // 16), dtype=torch.int32, device=device)


def _undo_cpu_packing(data: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed data and fp32 absmax back from bitsandbytes' CPU (AVX512-BF16) layout.

    bitsandbytes repacks a Linear4bit the first time it runs on such a CPU: 32-row tiles
    with the two nibbles of a byte 32 columns apart, and absmax transposed and rounded to
    bf16. The 4-bit indices come back exactly; the scales are the bf16 ones that
    bitsandbytes' CPU forward uses from then on.
    """
    out_features, in_features = state.shape
    tile = 32
    nibbles = data.view(torch.uint8).reshape(-1, 32)
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # (-1, 64)
    q = q.reshape(out_features // tile, in_features // 2, tile, 2).transpose(1, 2)
    q = q.reshape(out_features, in_features)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    absmax = state.absmax.t().float().contiguous()  # (in // blocksize, out) bf16 -> (out, in // blocksize)
    return packed.contiguous(), absmax


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up from the fused gate/up projection's output (gate's half first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def nf4_swiglu(x: torch.Tensor, w: NF4Weight, early: bool = False) -> torch.Tensor:
    """`silu_mul(nf4_linear(x, w))` for the fused gate/up weight `w`: x (..., in) -> (..., out / 2).

    On the "cuda" backend the matmul's epilogue does SiLU and the product (one kernel, half the
    output written, no elementwise kernel after it); elsewhere the two steps. `early`: see `nf4_linear`."""
    if w.backend != "cuda":
        return silu_mul(nf4_linear(x, w))
    rows = x.reshape(-1, w.in_features)
    out = torch.ops.mistral_t4.nf4_swiglu_fragments(rows, w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters,
                                                    early)
    return out.view(*x.shape[:-1], w.out_features // 2)


def nf4_linear_reference(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (..., in_features) -> (..., out_features): dequantize, then F.linear."""
    return F.linear(x, w.dequantize(x.dtype))


def nf4_linear(x: torch.Tensor, w: NF4Weight, early: bool = False) -> torch.Tensor:
    """x (..., in_features) fp16/fp32 -> (..., out_features), on the backend `w` was built for.

    `early` ("cuda" backend): launch the CUDA kernel with programmatic dependent launch, so that its
    CTAs may start while the kernel before it finishes (`nf4_cuda.nf4_matmul`); pays where that
    kernel is one of ours (it lets dependents start after its main loop)."""
    if w.backend == "reference":
        return nf4_linear_reference(x, w)
    if w.backend == "bnb":
        return torch.ops.bitsandbytes.gemm_4bit.default(
            x, w.packed.view(-1, 1), [w.out_features, w.in_features], w.absmax.view(-1), w.blocksize, "nf4"
        )
    if w.backend == "cuda":
        rows = x.reshape(-1, w.in_features)
        out = torch.ops.mistral_t4.nf4_linear_fragments(rows, w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters,
                                                        early)
        return out.view(*x.shape[:-1], w.out_features)
    assert w.backend == "triton", f"unknown NF4 backend {w.backend!r}"
    rows = x.reshape(-1, w.in_features)  # (M, K)
    out = torch.ops.mistral_t4.nf4_linear(
        rows, w.packed, w.absmax, w.code, w.lookup_table(x.dtype), w.tile_counters, w.blocksize
    )
    return out.view(*x.shape[:-1], w.out_features)


# `tile_counters` is not declared as mutated: the kernel returns every counter to zero
# before it exits, so to PyTorch the op is pure and needs no functionalization copies.
@torch.library.custom_op("mistral_t4::nf4_linear", mutates_args=())
def _nf4_linear_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    code_x: torch.Tensor,
    tile_counters: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """x (M, K) -> (M, N). `code` is the fp32 table, `code_x` the same table in x's dtype."""
    from . import nf4_triton

    if x.shape[0] <= FUSED_MAX_ROWS:
        return nf4_triton.nf4_matmul(x, packed, absmax, code_x, tile_counters, blocksize)
    weight = nf4_triton.nf4_dequantize(packed, absmax, code, blocksize, x.shape[1], x.dtype)
    return F.linear(x, weight)


@_nf4_linear_cuda.register_fake
def _(x, packed, absmax, code, code_x, tile_counters, blocksize):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("mistral_t4::nf4_linear_fragments", mutates_args=())
def _nf4_linear_fragments(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    code_fp16: torch.Tensor,
    tile_counters: torch.Tensor,
    early: bool = False,
) -> torch.Tensor:
    """x (M, K) -> (M, N) for the "cuda" backend (tile_counters: see `mistral_t4::nf4_linear`; early:
    see `nf4_linear`)."""
    from . import nf4_cuda

    if x.dtype == torch.float16 and x.shape[0] <= nf4_cuda.MAX_ROWS:
        return nf4_cuda.nf4_matmul(x, packed, absmax, code_fp16, tile_counters, early=early)
    if x.dtype == torch.float16:
        weight = nf4_cuda.nf4_dequantize(packed, absmax, code)
    else:
        weight = NF4Weight(packed, absmax, code, code_fp16, tile_counters, nf4_cuda.BLOCKSIZE, "cuda").dequantize(x.dtype)
    return F.linear(x, weight)


@_nf4_linear_fragments.register_fake
def _(x, packed, absmax, code, code_fp16, tile_counters, early=False):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("mistral_t4::nf4_swiglu_fragments", mutates_args=())
def _nf4_swiglu_fragments(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    code_fp16: torch.Tensor,
    tile_counters: torch.Tensor,
    early: bool = False,
) -> torch.Tensor:
    """x (M, K) -> (M, N / 2) SiLU(gate) * up for the "cuda" backend's fused gate/up weight (N rows:
    gate's, then up's): in the matmul's epilogue where `nf4_cuda.swiglu_supported`, else
    `mistral_t4::nf4_linear_fragments` and `silu_mul` (tile_counters: see `mistral_t4::nf4_linear`;
    early: see `nf4_linear`)."""
    from . import multiprocessor_count, nf4_cuda

    if x.dtype == torch.float16 and nf4_cuda.swiglu_supported(x.shape[0], packed.shape[0], multiprocessor_count(x.device)):
        return nf4_cuda.nf4_matmul(x, packed, absmax, code_fp16, tile_counters, early=early, swiglu=True)
    return silu_mul(_nf4_linear_fragments(x, packed, absmax, code, code_fp16, tile_counters, early))


@_nf4_swiglu_fragments.register_fake
def _(x, packed, absmax, code, code_fp16, tile_counters, early=False):
    return x.new_empty(x.shape[0], packed.shape[0] // 2)


def nf4_linear_residual(x: torch.Tensor, w: NF4Weight, residual: torch.Tensor, norm_weight: torch.Tensor,
                        early: bool = False):
    """`residual_norm_parts(residual, nf4_linear(x, w), norm_weight)`: x (rows, in) -> (residual + x W^T, that
    times norm_weight, its sums of squares per 16 columns (rows, out / 16) fp32); on "cuda" one kernel (its
    epilogue), elsewhere the steps. `early`: see `nf4_linear`."""
    from .norm import residual_norm_parts

    if w.backend != "cuda":
        return residual_norm_parts(residual, nf4_linear(x, w), norm_weight)
    return torch.ops.mistral_t4.nf4_linear_residual(x, w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters,
                                                    residual, norm_weight, early)


def nf4_linear_scaled(x: torch.Tensor, w: NF4Weight, sums: torch.Tensor, eps: float, early: bool = False,
                      swiglu: bool = False) -> torch.Tensor:
    """Each row of `nf4_linear(x, w)` times `rms_scales(sums, eps)` (x: `residual_norm_parts`' input times the
    norm's weight, `sums` its sums of squares), rounded once; `swiglu`: then `silu_mul` (the fused gate/up weight).
    On "cuda" one kernel (its epilogue), elsewhere the steps. `early`: see `nf4_linear`."""
    if w.backend != "cuda":
        return scale_rows(nf4_linear(x, w), sums, eps, x.dtype, swiglu)
    return torch.ops.mistral_t4.nf4_linear_scaled(x, w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters,
                                                  sums, eps, early, swiglu)


def scale_rows(y: torch.Tensor, sums: torch.Tensor, eps: float, dtype: torch.dtype,
               swiglu: bool = False) -> torch.Tensor:
    """y's rows times `rms_scales(sums, eps)` in fp32, rounded to `dtype`; `swiglu`: then `silu_mul` (the steps of
    `nf4_linear_scaled`'s epilogue)."""
    from .norm import rms_scales

    y = (y.float() * rms_scales(sums, eps)).to(dtype)
    return silu_mul(y) if swiglu else y


def _cuda_rows(x: torch.Tensor) -> bool:
    """Whether the CUDA kernels carry the RMSNorm for x (else the ops take the steps)."""
    from . import nf4_cuda

    return x.is_cuda and x.dtype == torch.float16 and x.shape[0] <= nf4_cuda.NORM_ROWS


@torch.library.custom_op("mistral_t4::nf4_linear_residual", mutates_args=())
def _nf4_linear_residual(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    code_fp16: torch.Tensor,
    tile_counters: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    early: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nf4_linear_residual` for the "cuda" backend: x (M, K), residual (M, N), norm_weight (N,)."""
    from . import nf4_cuda
    from .norm import residual_norm_parts

    if _cuda_rows(x):
        return nf4_cuda.nf4_matmul(x, packed, absmax, code_fp16, tile_counters, early=early, residual=residual,
                                   norm_weight=norm_weight)
    return residual_norm_parts(residual, _nf4_linear_fragments(x, packed, absmax, code, code_fp16, tile_counters),
                               norm_weight)


@_nf4_linear_residual.register_fake
def _(x, packed, absmax, code, code_fp16, tile_counters, residual, norm_weight, early=False):
    return (torch.empty_like(residual), torch.empty_like(residual),
            residual.new_empty((residual.shape[0], residual.shape[1] // 16), dtype=torch.float32))


@torch.library.custom_op("mistral_t4::nf4_linear_scaled", mutates_args=())
def _nf4_linear_scaled(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    code_fp16: torch.Tensor,
    tile_counters: torch.Tensor,
    sums: torch.Tensor,
    eps: float,
    early: bool = False,
    swiglu: bool = False,
) -> torch.Tensor:
    """`nf4_linear_scaled` for the "cuda" backend: x (M, K), sums (M, K / 16) -> (M, N), or (M, N / 2) `swiglu`."""
    from . import multiprocessor_count, nf4_cuda

    if _cuda_rows(x):
        fused = swiglu and nf4_cuda.swiglu_supported(x.shape[0], packed.shape[0], multiprocessor_count(x.device))
        y = nf4_cuda.nf4_matmul(x, packed, absmax, code_fp16, tile_counters, early=early, swiglu=fused, sq=sums,
                                eps=eps)
        return silu_mul(y) if swiglu and not fused else y
    return scale_rows(_nf4_linear_fragments(x, packed, absmax, code, code_fp16, tile_counters), sums, eps, x.dtype,
                      swiglu)


@_nf4_linear_scaled.register_fake
def _(x, packed, absmax, code, code_fp16, tile_counters, sums, eps, early=False, swiglu=False):
    return x.new_empty(x.shape[0], packed.shape[0] // 2 if swiglu else packed.shape[0])
