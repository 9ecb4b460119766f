"""NF4Weight and nf4_linear against bitsandbytes and the plain reference, on CPU.

The Triton kernels run under Triton's interpreter, which is chosen when Triton decorates
a kernel, i.e. when TRITON_INTERPRET=1 is set before `nf4_triton` is imported.
`test_triton_kernels_in_interpreter` therefore reruns this file's `interpreted` tests in a
subprocess with it set; in the normal run they are skipped.
"""

import dataclasses
import os
import re
import subprocess

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import INTERPRETED, run_interpreted_tests
from mistral_t4.kernels import NF4Weight, describe, nf4_linear, nf4_linear_reference, select_kernels
from mistral_t4.kernels.nf4 import FUSED_MAX_ROWS

interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernels_in_interpreter")

# N not a multiple of any tile; K a multiple of the 64-weight block, not of the 128-wide K step.
SHAPES = [(96, 320), (40, 192)]


def bnb_weight(out_features, in_features, double_quant=True, dtype=torch.float32, seed=0):
    """A quantized Params4bit, as `.weight` of a bnb.nn.Linear4bit on CPU holds it."""
    generator = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type="nf4")
    return layer.to("cpu").weight


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_bitsandbytes(shape, weight_dtype, double_quant, backend):
    param = bnb_weight(*shape, double_quant=double_quant, dtype=weight_dtype)
    w = NF4Weight.from_bnb(param, backend=backend)
    expected = bnb_functional.dequantize_4bit(param.data, param.quant_state)  # in weight_dtype
    assert (w.out_features, w.in_features) == shape
    assert w.backend == ("triton" if backend == "cuda" and shape[0] % 16 else backend)  # "cuda" needs 16-row groups
    if w.backend == "cuda":  # its scales rounded to fp16 at load (<= 2^-11): bitsandbytes' W from those scales
        reference = NF4Weight.from_bnb(param, backend="reference")
        # the test sees the rounding (an fp16 weight's block maximum is an fp16 value: exact then)
        assert torch.equal(reference.absmax.half().float(), reference.absmax) == (weight_dtype == torch.float16
                                                                                  and not double_quant)
        rounded = dataclasses.replace(reference, absmax=reference.absmax.half().float())
        torch.testing.assert_close(w.dequantize(torch.float32), expected.float(), rtol=2**-10, atol=0)  # (expected: fp16)
        expected = rounded.dequantize(weight_dtype)
    assert torch.equal(w.dequantize(weight_dtype), expected)
    assert torch.equal(w.dequantize(torch.float32).to(weight_dtype), expected)
    assert torch.equal(w.dequantize_plain(weight_dtype), expected)  # the plain PyTorch definition
    assert torch.equal(w.dequantize_plain(torch.float32), w.dequantize(torch.float32))


def test_layouts_per_backend():
    param = bnb_weight(96, 320)
    shared = NF4Weight.from_bnb(param, backend="reference")
    assert shared.packed.data_ptr() == param.data.data_ptr()  # bitsandbytes' buffer, no copy
    triton_w = NF4Weight.from_bnb(param, backend="triton")
    # 5 blocks of 64: 3 steps of 64 bytes, the last one's low half padded
    assert triton_w.packed.shape == (96, 192) and triton_w.packed.is_contiguous() and triton_w.absmax.is_contiguous()
    assert torch.equal(triton_w.bnb_packed(), shared.packed)
    cuda_w = NF4Weight.from_bnb(param, backend="cuda")  # same shapes, bytes and scales in fragment order
    assert cuda_w.packed.shape == (96, 160) and cuda_w.absmax.shape == (96, 5) and cuda_w.packed.is_contiguous()
    assert not torch.equal(cuda_w.packed, shared.packed) and torch.equal(cuda_w.bnb_packed(), shared.packed)
    assert cuda_w.absmax.dtype == torch.float16 and torch.equal(cuda_w.row_absmax(), shared.absmax.half().float())
    assert shared.nbytes == triton_w.nbytes == 96 * 160 + 96 * 5 * 4
    assert cuda_w.nbytes == 96 * 160 + 96 * 5 * 2  # fp16 scales


def test_cuda_backend_keeps_scales_fp16_can_hold():
    """A weight whose block maxima exceed fp16's range (65504) stays on Triton's layout (fp32 scales), exact as ever."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 1e6
    layer = bnb.nn.Linear4bit(128, 32, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    param = layer.to("cpu").weight
    huge = NF4Weight.from_bnb(param, backend="cuda")
    assert huge.backend == "triton" and huge.absmax.dtype == torch.float32 and huge.absmax.max() > 65504
    assert torch.equal(huge.dequantize(), bnb_functional.dequantize_4bit(param.data, param.quant_state))
    assert NF4Weight.from_bnb(bnb_weight(32, 128), backend="cuda").backend == "cuda"  # the usual weights stay


def test_fragment_layout():
    """Group G, block b, lane 4g + c, word t, byte 2h + rh: row 16G + g + 8rh, k = 64b + 16c + 4t + 2h
    in the low nibble and k + 1 in the high one (the A registers of mma.sync m16n8k16); scales:
    per (G, b) the pairs (row g, row g + 8), rounded to fp16."""
    from mistral_t4.kernels.nf4_cuda import from_fragments, to_fragments

    n, k = 32, 192
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    absmax = torch.rand(n, k // 64, generator=generator)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]  # bitsandbytes' order
    fragments, scales = to_fragments(packed, absmax)
    f = fragments.view(2, 3, 8, 4, 4, 4)  # (G, b, g, c, t, byte)
    pairs = scales.view(2, 3, 8, 2)
    for G, b, g, c, t, j in [(0, 0, 0, 0, 0, 0), (1, 2, 7, 3, 3, 3), (0, 1, 5, 2, 1, 2), (1, 0, 3, 1, 2, 1)]:
        row, col = 16 * G + g + 8 * (j % 2), 64 * b + 16 * c + 4 * t + 2 * (j // 2)
        assert int(f[G, b, g, c, t, j]) == int(q[row, col]) | int(q[row, col + 1]) << 4
        assert pairs[G, b, g, j % 2] == absmax[row, b].half()
    for G in range(2):  # every byte, vectorized: rebuild q from the formula
        for rh in range(2):
            for h in range(2):
                byte = f[G, :, :, :, :, 2 * h + rh]  # (b, g, c, t)
                cols = (64 * torch.arange(3)[:, None, None] + 16 * torch.arange(4)[None, :, None]
                        + 4 * torch.arange(4)[None, None, :] + 2 * h)  # (b, c, t)
                rows = 16 * G + 8 * rh + torch.arange(8)
                assert torch.equal(byte & 0xF, q[rows[None, :, None, None], cols[:, None]])
                assert torch.equal(byte >> 4, q[rows[None, :, None, None], cols[:, None] + 1])
    assert scales.dtype == torch.float16
    assert all(torch.equal(a, e) for a, e in zip(from_fragments(fragments, scales), (packed, absmax.half().float())))


@pytest.mark.parametrize("in_features, blocksize", [(256, 64), (320, 64), (384, 128), (64, 64)])
def test_halves_layout_round_trip(in_features, blocksize):
    """Step s, byte j: W[2Bs + j] in the high nibble, W[2Bs + B + j] in the low one (padding: 7)."""
    from mistral_t4.kernels.nf4_triton import from_halves, to_halves

    generator = torch.Generator().manual_seed(in_features)
    q = torch.randint(0, 16, (5, in_features), generator=generator, dtype=torch.uint8)  # 4-bit indices
    packed = (q[:, 0::2] << 4) | q[:, 1::2]  # bitsandbytes' order
    halves = to_halves(packed, blocksize)
    n_steps = -(-in_features // (2 * blocksize))
    assert halves.shape == (5, n_steps * blocksize)
    for s in range(n_steps):
        for j in (0, blocksize - 1):
            k_hi, k_lo = 2 * blocksize * s + j, 2 * blocksize * s + blocksize + j
            assert torch.equal(halves[:, s * blocksize + j] >> 4, q[:, k_hi])
            expected_lo = q[:, k_lo] if k_lo < in_features else torch.full((5,), 7, dtype=torch.uint8)
            assert torch.equal(halves[:, s * blocksize + j] & 0xF, expected_lo)
    assert torch.equal(from_halves(halves, blocksize, in_features), packed)


@pytest.mark.parametrize("rows", [1, 7, 32, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_linear_is_dequantize_then_matmul(shape, rows):
    param = bnb_weight(*shape)
    w = NF4Weight.from_bnb(param, backend="reference")
    x = torch.randn(rows, shape[1])
    expected = F.linear(x, bnb_functional.dequantize_4bit(param.data, param.quant_state))
    torch.testing.assert_close(nf4_linear_reference(x, w), expected, rtol=0, atol=0)
    assert torch.equal(nf4_linear(x, w), nf4_linear_reference(x, w))  # the CPU backend is the reference


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_nf4_swiglu_is_silu_of_the_projection(backend):
    """`nf4_swiglu` (on "cuda" the gate/up kernel's SwiGLU epilogue; on CPU its op's two-step path)
    equals `silu_mul` of `nf4_linear` and keeps leading dimensions; the "cuda" ops pass opcheck
    (schema, fake tensors, dynamic shapes), the matmul's with its `early` flag too."""
    from mistral_t4.kernels.nf4 import nf4_swiglu, silu_mul

    w = NF4Weight.from_bnb(bnb_weight(192, 128, seed=3), backend=backend)
    x = torch.randn(2, 3, 128)
    got = nf4_swiglu(x, w)
    assert got.shape == (2, 3, 96) and torch.equal(got, silu_mul(nf4_linear(x, w)))
    gate, up = (x @ w.dequantize(torch.float32).T).chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up)
    if backend == "cuda":
        args = (x.reshape(-1, 128), w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters)
        torch.library.opcheck(torch.ops.mistral_t4.nf4_swiglu_fragments, args)
        torch.library.opcheck(torch.ops.mistral_t4.nf4_linear_fragments, args + (True,))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_nf4_linear_carries_the_rms_norm(backend, swiglu):
    """`nf4_linear_residual` / `nf4_linear_scaled` (the RMSNorm in the "cuda" kernels' epilogues; here their ops'
    CPU path and the reference backend's steps): the residual parts equal `residual_norm_parts` of the plain
    product; the scaled product equals the plain one of rms_norm'ed input (to fp32 rounding), SiLU(gate) * up
    with `swiglu`; the "cuda" ops pass opcheck."""
    from mistral_t4.kernels.nf4 import nf4_linear_residual, nf4_linear_scaled, silu_mul
    from mistral_t4.kernels.norm import add_rms_norm, norm_parts, residual_norm_parts

    w = NF4Weight.from_bnb(bnb_weight(192, 128, seed=5), backend=backend)
    generator = torch.Generator().manual_seed(6)
    x, s = torch.randn(3, 128, generator=generator), torch.randn(3, 128, generator=generator)
    resid, norm_w = torch.randn(3, 192, generator=generator), 1 + 0.1 * torch.randn(192, generator=generator)
    parts = nf4_linear_residual(x, w, resid, norm_w)
    assert all(torch.equal(a, b) for a, b in zip(parts, residual_norm_parts(resid, nf4_linear(x, w), norm_w)))
    in_w = 1 + 0.1 * torch.randn(128, generator=generator)
    xw, sums = norm_parts(s, in_w)
    got = nf4_linear_scaled(xw, w, sums, 1e-5, swiglu=swiglu)
    expected = nf4_linear(add_rms_norm(torch.zeros_like(s), s, in_w, 1e-5)[1], w)
    torch.testing.assert_close(got, silu_mul(expected) if swiglu else expected, rtol=1e-5, atol=1e-5)
    if backend == "cuda":
        common = (w.packed, w.absmax, w.code, w.code_fp16, w.tile_counters)
        torch.library.opcheck(torch.ops.mistral_t4.nf4_linear_residual, (x, *common, resid, norm_w, True))
        torch.library.opcheck(torch.ops.mistral_t4.nf4_linear_scaled, (xw, *common, sums, 1e-5, True, swiglu))


def test_reference_keeps_leading_dimensions():
    w = NF4Weight.from_bnb(bnb_weight(40, 192), backend="reference")
    x = torch.randn(2, 3, 192)
    assert nf4_linear(x, w).shape == (2, 3, 40)
    torch.testing.assert_close(nf4_linear(x, w), nf4_linear(x.view(6, 192), w).view(2, 3, 40))


@pytest.mark.parametrize("rows", [1, 32])
def test_bnb_backend_arguments(rows):
    """The sm75 path's call into bitsandbytes' gemm_4bit, run by its CPU implementation."""
    param = bnb_weight(96, 320)
    w = NF4Weight.from_bnb(param, backend="bnb")
    x = torch.randn(rows, 320)
    torch.testing.assert_close(nf4_linear(x, w), nf4_linear_reference(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", "bnb", "cuda"])
@pytest.mark.parametrize("rows", [(64, 16, 40), (64, 16, 32)])
def test_concat_stacks_output_rows(backend, rows):
    params = [bnb_weight(n, 192, seed=n) for n in rows]
    parts = [NF4Weight.from_bnb(p, backend=backend) for p in params]
    fused = NF4Weight.concat(parts)
    assert (fused.out_features, fused.in_features) == (sum(rows), 192)
    if backend == "cuda":  # 40 rows make no 16-row groups: that part, then the whole, falls back to Triton
        assert fused.backend == ("triton" if 40 in rows else "cuda")
    # (a fallback from "cuda" takes Triton's fp32 scales: the fp16 ones, widened)
    assert fused.nbytes == sum(p.nbytes for p in parts) + sum(p.absmax.numel() * 2 for p in parts
                                                             if p.absmax.dtype != fused.absmax.dtype)
    if fused.backend == "triton":
        assert fused.packed.shape == (sum(rows), 128) and fused.tile_counters.numel() * 16 >= sum(rows)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_concat_rejects_different_in_features():
    a = NF4Weight.from_bnb(bnb_weight(16, 192))
    b = NF4Weight.from_bnb(bnb_weight(16, 128))
    with pytest.raises(AssertionError):
        NF4Weight.concat([a, b])


def test_to_keeps_values_and_layout():
    w = NF4Weight.from_bnb(bnb_weight(40, 192), backend="triton")
    moved = w.to("cpu")
    assert moved.packed.stride() == w.packed.stride()
    assert torch.equal(moved.dequantize(), w.dequantize())


@pytest.mark.skipif(not bnb_functional.has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16 CPUs")
def test_from_bnb_after_cpu_forward():
    """bitsandbytes repacks a Linear4bit for its CPU kernel on first use; from_bnb undoes that."""
    layer = bnb.nn.Linear4bit(192, 64, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 192) * 0.02, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()  # bitsandbytes repacks in eval mode only, as HF models run
    before = NF4Weight.from_bnb(layer.weight, backend="reference")
    expected = before.dequantize()
    with torch.no_grad():
        layer(torch.randn(2, 192))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = NF4Weight.from_bnb(layer.weight, backend="reference")
    assert torch.equal(after.packed, before.packed)  # the 4-bit indices come back exactly
    torch.testing.assert_close(after.dequantize(), expected, rtol=2**-8, atol=0)  # scales were rounded to bf16


@pytest.mark.parametrize(
    "name, parts, in_features",
    [("qkv 4096->6144", [4096, 1024, 1024], 4096), ("down 14336->4096", [4096], 14336)],
)
def test_mistral_shapes_at_one_row(name, parts, in_features):
    """Full-size Mistral-7B projections: layout, concat and the reference at M = 1."""
    params = [bnb_weight(n, in_features, dtype=torch.float16, seed=i) for i, n in enumerate(parts)]
    dense = torch.cat([bnb_functional.dequantize_4bit(p.data, p.quant_state) for p in params])
    for backend in ("reference", "triton", "cuda"):
        w = NF4Weight.concat([NF4Weight.from_bnb(p, backend=backend) for p in params])
        assert w.backend == backend, name
        if backend == "cuda":  # fp16 scales: within 2^-11 of the scales, 2^-11 of the fp16 W
            torch.testing.assert_close(w.dequantize(torch.float16).float(), dense.float(), rtol=2**-10, atol=0)
        else:
            assert torch.equal(w.dequantize(torch.float16), dense), name
        if backend == "reference":
            x = torch.randn(1, in_features, dtype=torch.float16)
            assert torch.equal(nf4_linear_reference(x, w), F.linear(x, dense))


def test_select_kernels(monkeypatch):
    monkeypatch.delenv("MISTRAL_T4_REFERENCE_KERNELS", raising=False)
    reference = {"nf4_linear": "reference", "decode_attention": "reference"}
    assert select_kernels("cpu") == reference
    assert select_kernels("cuda", force_reference=True) == reference
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert select_kernels("cuda") == {"nf4_linear": "triton", "decode_attention": "triton"}
    from mistral_t4.kernels import nf4_cuda

    compiles = []
    monkeypatch.setattr(nf4_cuda, "available", lambda device: compiles.append(device) or True)
    assert select_kernels("cuda", decode_rows=1) == {"nf4_linear": "cuda", "decode_attention": "triton"}
    assert select_kernels("cuda", decode_rows=64)["nf4_linear"] == "cuda"
    assert select_kernels("cuda", decode_rows=65)["nf4_linear"] == "triton"
    monkeypatch.setenv("MISTRAL_T4_NF4_CUDA_ROWS", "8")  # to compare: 9-64 slots back on Triton
    assert select_kernels("cuda", decode_rows=8)["nf4_linear"] == "cuda"
    assert select_kernels("cuda", decode_rows=9)["nf4_linear"] == "triton"
    monkeypatch.delenv("MISTRAL_T4_NF4_CUDA_ROWS")
    monkeypatch.setenv("MISTRAL_T4_NF4_CUDA", "0")
    assert select_kernels("cuda", decode_rows=1)["nf4_linear"] == "triton"
    monkeypatch.delenv("MISTRAL_T4_NF4_CUDA")
    monkeypatch.setattr(nf4_cuda, "available", lambda device: False)  # no NVRTC, or it failed to compile
    assert select_kernels("cuda", decode_rows=1)["nf4_linear"] == "triton"
    assert len(compiles) == 3  # only asked when the batch is small enough
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_kernels("cuda") == {"nf4_linear": "bnb", "decode_attention": "reference"}
    t4 = select_kernels("cuda")
    # a T4 with the CUDA kernel: ours where it is faster than bitsandbytes' on the card (`nf4_race`), at <= 64 rows
    import mistral_t4.kernels as kernels_module

    monkeypatch.setattr(nf4_cuda, "available", lambda device: True)
    times = {}
    monkeypatch.setattr(kernels_module, "nf4_race", lambda device, rows, shapes: times.setdefault((rows, shapes),
                                                                                                  race[rows]))
    race = {32: {"cuda": 1.0, "bnb": 3.0}, 1: {"cuda": 2.0, "bnb": 1.5}}
    assert select_kernels("cuda", decode_rows=32) == {"nf4_linear": "cuda", "decode_attention": "reference"}
    assert select_kernels("cuda", decode_rows=1, shapes=((64, 128),))["nf4_linear"] == "bnb"
    assert set(times) == {(32, kernels_module.MISTRAL_7B_SHAPES), (1, ((64, 128),))}
    assert select_kernels("cuda", decode_rows=65)["nf4_linear"] == "bnb"  # no race past the kernel's rows
    monkeypatch.setenv("MISTRAL_T4_NF4_CUDA", "0")
    assert select_kernels("cuda", decode_rows=32)["nf4_linear"] == "bnb"
    monkeypatch.delenv("MISTRAL_T4_NF4_CUDA")
    assert len(times) == 2
    monkeypatch.setattr(nf4_cuda, "available", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # what gpu_check.py runs on a big card as the T4's path: the same choice as on a T4 itself
    assert select_kernels("cuda", decode_rows=4, capability=(7, 5)) == t4
    monkeypatch.setenv("MISTRAL_T4_REFERENCE_KERNELS", "1")
    assert select_kernels("cuda") == reference
    line = describe(select_kernels("cpu"))
    assert line.startswith("kernels: nf4_linear=reference") and "\n" not in line


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
@pytest.mark.parametrize("capability, mma", [(80, "mma.sync"), (90, "wgmma")])
def test_fused_kernel_compiles_for_gpus(capability, mma, tmp_path):
    """The GPU path (PTX lookup, tensor cores) compiled for sm80 / sm90 here, with no GPU.

    The interpreter runs the gather path only; this catches a kernel that would fail to
    compile, spill registers to local memory, or lose the prmt lookup or the MMA.
    """
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mistral_t4.kernels import nf4_triton

    pointers = dict(x_ptr="*fp16", packed_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp16", out_ptr="*fp16",
                    partial_ptr="*fp32", counter_ptr="*i32")
    scalars = dict.fromkeys(["M", "N", "K", "stride_xm", "stride_om", "stride_pn", "stride_an"], "i32")
    constants = dict(BLOCKSIZE=64, BLOCK_M=32, BLOCK_N=64, SPLIT_K=4, DOT_PRECISION="tf32", USE_ASM=True)
    signature = {**pointers, **scalars, **dict.fromkeys(constants, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "M" and name in {**pointers, **scalars}}
    source = ASTSource(fn=nf4_triton._nf4_matmul_kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=4, num_stages=3))
    ptx = compiled.asm["ptx"]
    assert ptx.count("prmt.b32") >= 16 and mma in ptx
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):  # ships with Triton's wheel
        cubin = tmp_path / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
        assert re.search(r"LOCAL:0\b", usage) and re.search(r"STACK:0\b", usage), f"registers spilled: {usage}"


def test_cuda_geometry_rule():
    """Row groups per CTA, split-K across CTAs and K ranges per CTA of the Mistral-7B decode shapes
    on a 132-SM card (the H200, whose sweep fitted the rule), and the rule's bounds: an even group
    count, K ranges the CTA's warps can hold of >= 4 K blocks each, a power-of-two split up to 16
    with at least 4 K blocks each, never more than one wave where one wave of the whole tile fits;
    which kernel each shape takes at 1-64 rows (`kernel_for`)."""
    from mistral_t4.kernels.nf4_cuda import GROUPS_PER_WARP, KERNELS, WARPS, kernel_for, matmul_geometry

    chosen = {name: matmul_geometry(n, k, 132) for name, k, n in [
        ("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]}
    assert chosen == {"qkv": (4, 1, 8), "o": (2, 1, 16), "gate_up": (14, 1, 2), "down": (2, 1, 16)}
    chosen = {name: matmul_geometry(n, k, 132, groups_per_warp=1) for name, k, n in [  # 16 warps of 1 group
        ("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]}
    assert chosen == {"qkv": (4, 1, 4), "o": (2, 1, 8), "gate_up": (14, 1, 1), "down": (2, 1, 8)}
    chosen = {name: matmul_geometry(n, k, 132, groups_per_warp=2, warps=12) for name, k, n in [  # the 32-row one's
        ("o", 4096, 4096), ("down", 14336, 4096)]}
    assert chosen == {"o": (2, 1, 12), "down": (2, 1, 12)}  # the sweep's best
    chosen = {name: matmul_geometry(n, k, 132, groups_per_warp=4, warps=8) for name, k, n in [  # the wide one's
        ("qkv", 4096, 6144), ("gate_up", 4096, 28672)]}
    assert chosen == {"qkv": (4, 1, 8), "gate_up": (14, 1, 2)}
    chosen = {name: matmul_geometry(n, k, 132, groups_per_warp=2, warps=8) for name, k, n in [  # the 64-row one's
        ("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]}
    assert chosen == {"qkv": (4, 1, 4), "o": (2, 1, 8), "gate_up": (14, 1, 1), "down": (2, 1, 8)}  # the sweep's best
    picks = {(name, m): kernel_for(m, n, 132).name for name, n in [("qkv", 6144), ("o", 4096), ("gate_up", 28672)]
             for m in (1, 8, 9, 16, 17, 32)}
    assert {m: picks["o", m] for m in (1, 8, 9, 16, 17, 32)} == {
        1: "nf4_matmul", 8: "nf4_matmul", 9: "nf4_matmul16", 16: "nf4_matmul16", 17: "nf4_matmul32", 32: "nf4_matmul32"}
    assert picks["qkv", 32] == picks["gate_up", 17] == "nf4_matmul32w" and picks["gate_up", 16] == "nf4_matmul16"
    assert kernel_for(32, 6144, 200).name == "nf4_matmul32"  # 384 groups on 200 SMs: too few for the wide one
    assert {kernel_for(m, n, sms).name for m in (33, 47, 64) for n, sms in [(4096, 132), (28672, 132), (64, 200)]} == {
        "nf4_matmul64"}
    from mistral_t4.kernels.nf4_cuda import describe_plans

    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    assert describe_plans(32, shapes, 132) == {"qkv": "nf4_matmul32w (4, 1, 8)", "o": "nf4_matmul32 (2, 1, 12)",
                                               "gate_up": "nf4_matmul32w (14, 1, 2)", "down": "nf4_matmul32 (2, 1, 12)"}
    assert describe_plans(64, shapes, 132) == {"qkv": "nf4_matmul64 (4, 1, 4)", "o": "nf4_matmul64 (2, 1, 8)",
                                               "gate_up": "nf4_matmul64 (14, 1, 1)", "down": "nf4_matmul64 (2, 1, 8)"}
    assert describe_plans(1, shapes, 132) == {"qkv": "nf4_matmul (4, 1, 8)", "o": "nf4_matmul (2, 1, 16)",
                                              "gate_up": "nf4_matmul (14, 1, 2)", "down": "nf4_matmul (2, 1, 16)"}
    # SiLU(gate) * up in the epilogue: the same warps and ranges over half the output groups; a kernel of
    # 1 group per warp has no such instance
    swiglu = frozenset({"gate_up"})
    assert {rows: describe_plans(rows, shapes, 132, swiglu)["gate_up"] for rows in (1, 16, 32, 64)} == {
        1: "nf4_matmul_swiglu (7, 1, 2)", 16: "nf4_matmul16_swiglu (7, 1, 2)", 32: "nf4_matmul32w_swiglu (7, 1, 2)",
        64: "nf4_matmul64_swiglu (7, 1, 1)"}
    assert describe_plans(32, {"gate_up": (2048, 4096)}, 132, swiglu) == {"gate_up": "nf4_matmul32_swiglu (1, 2, 8)"}
    assert describe_plans(32, {"gate_up": (2064, 4096)}, 132, swiglu) == {"gate_up": "nf4_matmul32 (2, 2, 8)"}  # odd halves
    for n, k, sms in [(16, 64, 1000), (16, 256, 1000), (64, 1 << 20, 1000), (1 << 20, 4096, 1), (28672, 4096, 58),
                      (4096, 4096, 114), (960, 576, 40)]:
        for groups_per_warp, warps in {(GROUPS_PER_WARP, WARPS), (1, WARPS)} | {(k.groups, k.warps) for k in KERNELS}:
            tile, split, slices = matmul_geometry(n, k, sms, groups_per_warp=groups_per_warp, warps=warps)
            assert 2 <= tile <= warps * groups_per_warp and tile % 2 == 0
            assert split in (1, 2, 4, 8, 16) and (split == 1 or k // 64 // split >= 4)
            assert 1 <= slices and -(-tile // groups_per_warp) * slices <= warps
            assert slices == 1 or k // 64 // split // slices >= 4
            if -(-(n // 16) // (warps * groups_per_warp)) <= sms:
                assert -(-(n // 16) // tile) * split <= sms


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_90"])
def test_cuda_kernels_compile_for_gpus(arch, tmp_path):
    """The "cuda" backend's source, compiled here by NVRTC (a test dependency) with no GPU:
    it compiles, keeps everything in registers, and uses the tensor cores (HMMA: m16n8k16, on a T4
    two m16n8k8); the `scale_a` kernels, and only they, multiply in fp16 pairs; on a T4 a CTA of each
    kernel fits the SM's 64K registers."""
    from mistral_t4.kernels import nf4_cuda

    if nf4_cuda.nvrtc_library() is None:
        pytest.skip("NVRTC is not installed (scripts/setup.sh test installs it)")
    cubin = tmp_path / "nf4.cubin"
    cubin.write_bytes(nf4_cuda._nvrtc_compile(nf4_cuda.SOURCE, arch)[0])
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    specs = {kernel.name: kernel for kernel in nf4_cuda.KERNELS}
    specs |= {kernel.name + "_swiglu": kernel for kernel in nf4_cuda.KERNELS if kernel.swiglu}
    specs |= {nf4_cuda.kernel_name(*spec): spec[0] for spec in nf4_cuda.norm_kernels()}  # with the RMSNorm's parts
    names = list(specs)
    assert {"nf4_matmul_residual", "nf4_matmul_scaled", "nf4_matmul16_scaled_swiglu"} <= set(names)
    assert len(names) == 16 and all(name in usage for name in names) and "nf4_dequantize" in usage and "smem_base" in usage
    assert len(re.findall(r"LOCAL:0\b", usage)) == len(names) + 2 and "STACK:0" in usage, usage
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    functions = {f.split("\n", 1)[0].strip(): f for f in sass.split("Function : ")[1:]}
    for name in names:
        matmul = functions[name]
        # the table address is one byte permute (PRMT ..., 0x76j4, lane_base) per shared-memory load
        mma = "HMMA.1688.F32" if arch == "sm_75" else "HMMA.16816.F32"
        assert mma in matmul and len(re.findall(r"PRMT R\d+, R\d+(\.reuse)?, 0x76[0-3]4", matmul)) >= 16
        assert len(re.findall(r"\bLDS\b", matmul)) >= 16
        # `scale_a` kernels scale the looked-up pairs in fp16 (HMUL2) before the MMAs; the others scale sums in fp32
        assert ("HMUL2" in matmul) == specs[name].scale_a
        # programmatic dependent launch on sm90 (griddepcontrol.wait / .launch_dependents), nothing on older cards
        assert ("ACQBULK" in matmul and "PREEXIT" in matmul) == (arch == "sm_90")
    if arch == "sm_75":  # 64K registers per SM, one CTA of `warps` warps
        registers = dict(re.findall(r"Function (\w+):\s*REG:(\d+)", usage))
        for name in names:
            assert int(registers[name]) * 32 * specs[name].warps <= 65536, (name, registers[name])


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
def test_cuda_kernels_compiled_once_per_disk(tmp_path, monkeypatch):
    """The NVRTC image is kept in the package's cache directory: a second process (here: the second call) loads
    it instead of compiling; another arch or source is compiled anew; an unwritable cache still compiles."""
    from mistral_t4.kernels import nf4_cuda

    if nf4_cuda.nvrtc_library() is None:
        pytest.skip("NVRTC is not installed (scripts/setup.sh test installs it)")
    monkeypatch.setenv("MISTRAL_T4_CACHE", str(tmp_path))
    source = nf4_cuda.SOURCE.split("#define NF4_KERNEL")[0] + "\n"  # the helpers and smem_base: a quick compile
    image, _ = nf4_cuda.compiled(source, "sm_75")
    assert image == nf4_cuda._nvrtc_compile(source, "sm_75")[0] and len(list((tmp_path / "nvrtc").iterdir())) == 1
    calls = []
    real = nf4_cuda._nvrtc_compile
    monkeypatch.setattr(nf4_cuda, "_nvrtc_compile", lambda *a: calls.append(a) or real(*a))
    assert nf4_cuda.compiled(source, "sm_75") == (image, "") and not calls
    assert nf4_cuda.compiled(source, "sm_80")[0] != image and len(calls) == 1
    assert nf4_cuda.compiled(source + "// changed\n", "sm_75")[0] and len(calls) == 2
    assert len(list((tmp_path / "nvrtc").iterdir())) == 3
    (tmp_path / "blocked").write_text("a file where the cache directory would go")
    monkeypatch.setenv("MISTRAL_T4_CACHE", str(tmp_path / "blocked"))
    assert nf4_cuda.compiled(source, "sm_75")[0] == image and len(calls) == 3


def test_nf4_race_survives_a_failing_backend(monkeypatch):
    """A backend that fails its race (bitsandbytes missing, a kernel error) gets inf and its error, is not chosen,
    and loading goes on; `races()` reports it (None for JSON). Run on CPU tensors with the timing replaced: the
    timing itself needs a GPU (checked on the H200, bench/results/h200_2026-11-27_s12_sm75_code/)."""
    import mistral_t4.kernels as kernels_module

    def timed(device, ws, xs):
        assert [w.out_features for w in ws] == [96, 64] and set(xs) == {64, 128}
        assert all(xs[w.in_features].shape == (3, w.in_features) for w in ws)
        if ws[0].backend == "cuda":
            raise RuntimeError("CUDA driver: launch of nf4_matmul failed")
        return 0.5

    monkeypatch.setattr(kernels_module, "_graph_time_ms", timed)
    monkeypatch.setattr(kernels_module, "_RACES", {})
    race = kernels_module.nf4_race("cpu", 3, ((96, 64), (64, 128)))
    assert race == {"cuda": float("inf"), "cuda_error": "RuntimeError: CUDA driver: launch of nf4_matmul failed",
                    "bnb": 0.5}
    assert kernels_module.races() == {"cpu, 3 rows": {"cuda": None, "cuda_error": race["cuda_error"], "bnb": 0.5}}
    assert kernels_module.nf4_race("cpu", 3, ((96, 64), (64, 128))) is race  # cached: raced once per shape


def test_cuda_shared_plan():
    """K ranges per CTA where the table and the sums fit a block; a T4 (a 64 KB block, its window from 0) gets the
    table alone and one range per CTA, as does compute_75 PTX run on an H200; an L4's 99 KB cannot hold the table."""
    from mistral_t4.kernels import nf4_cuda

    h200_table = 127 * 1024  # the window starts at 1 KB
    ranges, shared = nf4_cuda.shared_plan(h200_table, 227 * 1024)
    assert ranges and shared["nf4_matmul"] == h200_table and shared["nf4_matmul64"] == h200_table + 64 * 1024
    assert nf4_cuda.shared_plan(65536, 65536) == (False, {kernel.name: 65536 for kernel in nf4_cuda.KERNELS})
    assert nf4_cuda.shared_plan(h200_table, 227 * 1024, "compute_75")[0] is False
    ranges, shared = nf4_cuda.shared_plan(h200_table, 99 * 1024)
    assert not ranges and max(shared.values()) > 99 * 1024  # `available` says no
    for rows in (1, 8, 32, 64):  # without ranges, every plan is one range per CTA
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
            kernel, tile, split, slices = nf4_cuda.launch_plan(rows, n, k, 40, ranges=False)
            assert slices == 1 and tile <= kernel.warps * kernel.groups and split >= 1


def test_cuda_rows_setting(monkeypatch):
    """Engines of at most 64 slots take the CUDA NF4 kernel unless MISTRAL_T4_NF4_CUDA_ROWS says
    otherwise (1..64); anything else is a clear error, not a silent default."""
    from mistral_t4.kernels import NF4_CUDA_ROWS_ENV, cuda_rows, nf4_cuda

    monkeypatch.delenv(NF4_CUDA_ROWS_ENV, raising=False)
    assert cuda_rows() == nf4_cuda.ENGINE_ROWS == nf4_cuda.MAX_ROWS == 64
    for value, rows in [("8", 8), ("16", 16), (" 1", 1), ("64", 64)]:
        monkeypatch.setenv(NF4_CUDA_ROWS_ENV, value)
        assert cuda_rows() == rows
    for value in ["0", "65", "eight", "-4", ""]:
        monkeypatch.setenv(NF4_CUDA_ROWS_ENV, value)
        with pytest.raises(ValueError, match="MISTRAL_T4_NF4_CUDA_ROWS"):
            cuda_rows()


def test_cuda_launch_config_layout():
    """The ctypes mirrors of the driver's CUlaunchAttribute / CUlaunchConfig (cuda.h, 64-bit) that
    an early (programmatic dependent) launch passes to cuLaunchKernelEx: sizes and offsets."""
    import ctypes

    from mistral_t4.kernels.nf4_cuda import _LaunchAttribute, _LaunchConfig

    assert ctypes.sizeof(_LaunchAttribute) == 72 and _LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_LaunchConfig) == 56
    assert (_LaunchConfig.shared.offset, _LaunchConfig.stream.offset, _LaunchConfig.attrs.offset,
            _LaunchConfig.count.offset) == (24, 32, 40, 48)


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (nibble i of selector) & 7 of
    the 8 bytes b:a, or that byte's sign replicated when the nibble's bit 3 is set."""
    pool = (b << 32 | a).to_bytes(8, "little")
    out = 0
    for i in range(4):
        nibble = selector >> (4 * i) & 15
        byte = pool[nibble & 7]
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


@pytest.mark.parametrize("window_start", [0, 1024, 48 * 1024])
def test_cuda_table_address_is_one_prmt(window_start):
    """The kernel's lookup address prmt(word, table | 4 lane, 0x76j4) is table + 256 byte_j + 4 lane
    for every byte and lane, inside the 64 KB the host sizes, and lane l always hits bank l."""
    from mistral_t4.kernels import nf4_cuda

    table = (window_start + 0xFFFF) & ~0xFFFF
    size = table - window_start + 65536
    assert size <= 128 * 1024
    rng = np.random.default_rng(window_start)
    words = [int(w) for w in rng.integers(0, 2**32, size=64, dtype=np.uint64)] + [0, 0xFFFFFFFF, 0x80FF7F01]
    for lane in range(32):
        lane_base = table | (lane << 2)
        for w in words:
            for j in range(4):
                address = prmt(w, lane_base, 0x7604 | (j << 4))
                assert address == table + 256 * (w >> (8 * j) & 0xFF) + 4 * lane
                assert window_start <= address < window_start + size and (address // 4) % 32 == lane
    assert "0x7604" in nf4_cuda.SOURCE and "0x7634" in nf4_cuda.SOURCE


def _swiglu_fp16(gate, up):
    """The kernel's epilogue (`swiglu` in nf4_cuda.SOURCE): both sums rounded to fp16, SiLU in fp32 rounded, the product rounded."""
    g = np.float32(np.float16(gate))
    silu = np.float16(g / (np.float32(1) + np.exp(-g)))
    return np.float16(np.float32(silu) * np.float32(np.float16(up))).astype(np.float64)


def _emulate_cuda_matmul(x, fragments, scales, code_fp16, split_k, tile_groups, slices=1, kernel="nf4_matmul",
                         window_start=1024, swiglu=False):
    """nf4_cuda's kernel `kernel` (a name in `KERNELS`, or any `Kernel` instance of the template: its
    column tiles of 8 rows, row groups per warp and warps) step by step on CPU: the table built in a byte array standing for the CTA's
    shared window, each pair's address from prmt, the loads each lane makes, mma.sync m16n8k16's
    fragment semantics (A rows g / g + 8, K slots 2c, 2c + 1 / + 8; B K slots 2c, 2c + 1 / + 8 of
    column g; D rows g / g + 8, columns 2c, 2c + 1), the per-block scaling (`scale_a` kernels: each
    looked-up pair times its row's absmax in fp16, before the MMAs), the warps' K ranges
    (`slices`) and their sums, the stores and the split-K sum in split order. Products and sums
    in fp64 (the tensor core's order differs). `swiglu`: the `_swiglu` instance for a fused gate/up
    weight, tiles in output groups, each warp's first half of groups gate's and second half up's
    (N / 32 groups on), SiLU(gate) * up in the epilogue (`_swiglu_fp16`); -> (M, N / 2)."""
    from mistral_t4.kernels import nf4_cuda

    spec = kernel if isinstance(kernel, nf4_cuda.Kernel) else next(s for s in nf4_cuda.KERNELS if s.name == kernel)
    column_tiles, groups_per_warp, warps = spec.tiles, spec.groups, spec.warps
    m, k = x.shape
    assert m <= spec.rows
    n = fragments.shape[0]
    nb, n_groups = k // 64, n // 16
    words = fragments.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(n_groups, nb, 32, 4)
    pairs = scales.contiguous().numpy().reshape(n_groups, nb, 8, 2)
    xh = x.numpy().astype(np.float64)
    code_bits = code_fp16.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    table = (window_start + 0xFFFF) & ~0xFFFF
    shared = np.zeros(table - window_start + 65536, dtype=np.uint8)  # the window, from window_start
    for i in range(2048):  # the kernel's fill loop
        b = i >> 3
        v = int(code_bits[b & 15]) | int(code_bits[b >> 4]) << 16
        at = table + b * 256 + (i & 7) * 16 - window_start
        shared[at:at + 16] = np.frombuffer(np.array([v] * 4, dtype=np.uint32).tobytes(), dtype=np.uint8)
    lane = np.arange(32)
    g, c = lane >> 2, lane & 3
    lane_base = table | (lane << 2)
    # the byte permutes of A registers a0..a3, as the kernel's source has them
    selectors = dict(re.findall(r"u32 a(\d) = lds\(prmt\(w, lane_base, (0x[0-9a-fA-F]+)\)\);", nf4_cuda.SOURCE))
    selectors = [int(selectors[str(j)], 16) for j in range(4)]
    # where lane c's x values start (in halves) and where its second 16-byte load is (in 16-byte units), as the source has them
    # which absmax scales each A register of the `scale_a` kernels (0: row g, 1: row g + 8), as the source has it
    scale_rows = {int(j): int(name == "scale_g8")
                  for j, name in re.findall(r"a(\d) = hmul2\(a\d, (scale_g8|scale_g)\);", nf4_cuda.SOURCE)}
    assert sorted(scale_rows) == [0, 1, 2, 3]
    x_lane_halves = int(re.search(r"x \+ \(size_t\)row \* stride_xm \+ c \* (\d+)\)", nf4_cuda.SOURCE).group(1))
    x_second = int(re.search(r"hi = ld_x\(xp \+ b \* 8 \+ (\d+)\)", nf4_cuda.SOURCE).group(1))

    def lds(addresses):  # 32 lanes' 4-byte loads -> fp16 pairs (low half = k, high half = k + 1)
        offsets = addresses - window_start
        assert np.all((offsets >= 0) & (offsets + 4 <= shared.size)), "outside the window"
        raw = np.stack([shared[o:o + 4] for o in offsets]).copy().view(np.uint32)[:, 0]
        return np.stack([raw & 0xFFFF, raw >> 16], axis=1).astype(np.uint16).view(np.float16).astype(np.float64)

    def prmt_lanes(word, selector):
        return np.array([prmt(int(w), int(lb), selector) for w, lb in zip(word, lane_base)], dtype=np.int64)

    outputs = n // 2 if swiglu else n
    per_warp = groups_per_warp // 2 if swiglu else groups_per_warp  # output groups per warp
    out = np.full((m, outputs), np.nan)
    partial = np.zeros((split_k, m, n))
    per = -(-nb // split_k)
    for bx in range(-(-(outputs // 16) // tile_groups)):
        first = bx * tile_groups
        end = min(outputs // 16, first + tile_groups)
        for by in range(split_k):
            kb0, kb1 = by * per, min(by * per + per, nb)
            per_slice = warps // slices  # nf4_tile: warp w takes K range w // per_slice, groups of w % per_slice
            in_slice = -(-(kb1 - kb0) // slices)
            sums = {}
            for warp in range(warps):
                s = warp // per_slice
                g0 = first + (warp - s * per_slice) * per_warp if s < slices else end
                r0 = min(kb0 + s * in_slice, kb1) if slices > 1 else kb0
                r1 = min(r0 + in_slice, kb1) if slices > 1 else kb1
                acc = np.zeros((groups_per_warp, column_tiles, 32, 4))
                if g0 < end:
                    for b in range(r0, r1):
                        xv = []  # per column tile: lane row g of the B tile is x's row 8 nt + g, clamped to M - 1
                        for nt in range(column_tiles):
                            x_rows = np.minimum(8 * nt + g, m - 1)
                            start = 64 * b + x_lane_halves * c  # the lane's two 16-byte loads
                            xv.append(np.stack([np.concatenate([xh[x_rows[l], start[l]:start[l] + 8],
                                                                xh[x_rows[l], start[l] + 8 * x_second:][:8]])
                                                for l in range(32)]))
                        for q in range(groups_per_warp):
                            gq = min(g0 + q, end - 1)
                            if swiglu and q >= per_warp:  # the up rows of output group g0 + q - per_warp
                                gq = min(g0 + q - per_warp, end - 1) + n_groups // 2
                            block = np.zeros((column_tiles, 32, 4))
                            pair = pairs[gq, b, g]  # (32, 2): absmax of rows g and g + 8
                            for t in range(4):
                                a = [lds(prmt_lanes(words[gq, b, :, t], selectors[j])) for j in range(4)]
                                if spec.scale_a:  # the weights in fp16: each pair times its row's absmax, rounded
                                    half = pair.astype(np.float16).astype(np.float64)
                                    a = [(v * half[:, [scale_rows[j]]]).astype(np.float16).astype(np.float64)
                                         for j, v in enumerate(a)]
                                A = np.zeros((16, 16))
                                for l in range(32):
                                    A[g[l], 2 * c[l]:2 * c[l] + 2] = a[0][l]
                                    A[g[l] + 8, 2 * c[l]:2 * c[l] + 2] = a[1][l]
                                    A[g[l], 2 * c[l] + 8:2 * c[l] + 10] = a[2][l]
                                    A[g[l] + 8, 2 * c[l] + 8:2 * c[l] + 10] = a[3][l]
                                for nt in range(column_tiles):
                                    B = np.zeros((16, 8))
                                    for l in range(32):
                                        # b0 = word (2t) & 3 of x's 16-byte load t >> 1, b1 = the next word
                                        B[2 * c[l]:2 * c[l] + 2, g[l]] = xv[nt][l, 8 * (t >> 1) + 2 * ((2 * t) & 3):][:2]
                                        B[2 * c[l] + 8:2 * c[l] + 10, g[l]] = xv[nt][l, 8 * (t >> 1) + 2 * ((2 * t + 1) & 3):][:2]
                                    D = A @ B
                                    for l in range(32):
                                        block[nt, l] += [D[g[l], 2 * c[l]], D[g[l], 2 * c[l] + 1],
                                                         D[g[l] + 8, 2 * c[l]], D[g[l] + 8, 2 * c[l] + 1]]
                            acc[q] += block if spec.scale_a else block * np.repeat(pair, 2, axis=1)
                sums[warp] = (s, g0, acc)
            for warp, (s, g0, acc) in sums.items():
                if s != 0:  # only range 0's warps store, after adding the other ranges' sums in range order
                    continue
                for other in range(1, slices):
                    acc = acc + sums[warp + other * per_slice][2]
                for q in range(per_warp):
                    if g0 + q >= end:
                        break
                    for nt in range(column_tiles):
                        for i in range(4):
                            mm, nn = 8 * nt + 2 * c + (i & 1), (g0 + q) * 16 + g + 8 * (i >> 1)
                            keep = mm < m
                            if split_k > 1:  # partials of both halves: gate at n, up at n + N / 2
                                partial[by][mm[keep], nn[keep]] = acc[q, nt][keep, i]
                                if swiglu:
                                    partial[by][mm[keep], nn[keep] + outputs] = acc[q + per_warp, nt][keep, i]
                            elif swiglu:
                                out[mm[keep], nn[keep]] = _swiglu_fp16(acc[q, nt][keep, i], acc[q + per_warp, nt][keep, i])
                            else:
                                out[mm[keep], nn[keep]] = acc[q, nt][keep, i]
    if split_k > 1:
        total = np.zeros((m, n))
        for by in range(split_k):  # the last CTA's sum, in split order
            total = total + partial[by]
        out = _swiglu_fp16(total[:, :outputs], total[:, outputs:]) if swiglu else total
    return out


@pytest.mark.parametrize("n, k, m, split_k, tile_groups, slices, kernel", [
    (48, 192, 1, 1, 32, 1, "nf4_matmul"), (48, 576, 3, 2, 2, 1, "nf4_matmul"), (1040, 192, 8, 3, 32, 1, "nf4_matmul"),
    (560, 320, 5, 4, 17, 1, "nf4_matmul"), (1040, 128, 2, 1, 22, 1, "nf4_matmul"), (96, 1024, 1, 1, 2, 16, "nf4_matmul"),
    (208, 960, 4, 2, 6, 5, "nf4_matmul"), (96, 448, 7, 1, 10, 3, "nf4_matmul"), (48, 320, 8, 1, 4, 8, "nf4_matmul"),
    (208, 512, 13, 1, 6, 5, "nf4_matmul16"), (96, 384, 16, 2, 4, 8, "nf4_matmul16"), (112, 448, 32, 1, 4, 4, "nf4_matmul32"),
    (208, 320, 27, 2, 6, 2, "nf4_matmul32"), (48, 256, 9, 1, 16, 1, "nf4_matmul32"),
    # the wide 32-row kernel: 8 warps of 4 groups (a tile of 14 in 2 ranges leaves the last warp of each half busy)
    (464, 512, 32, 1, 14, 2, "nf4_matmul32w"), (96, 576, 17, 1, 4, 8, "nf4_matmul32w"), (240, 320, 25, 2, 6, 3, "nf4_matmul32w"),
    (48, 256, 30, 1, 32, 1, "nf4_matmul32w"),
    # the 64-row kernel: 8 warps of 2 groups, 8 column tiles (M just past 32, odd M, a split, ranges with idle warps)
    (240, 384, 64, 1, 8, 2, "nf4_matmul64"), (96, 512, 33, 3, 4, 4, "nf4_matmul64"), (208, 320, 57, 1, 6, 2, "nf4_matmul64")])
def test_cuda_kernel_emulated(n, k, m, split_k, tile_groups, slices, kernel):
    """The CUDA kernel's index math, run on CPU by `_emulate_cuda_matmul` on fresh random inputs
    (groups past a tile's end, tiles that leave warps half busy or idle, uneven and empty splits,
    K ranges per CTA: 16 of 1 group pair, 5 with an idle warp, uneven and empty ranges, M < 8),
    equals the reference, and every
    output (poisoned with NaN first) is written. The emulator takes the byte-permute selectors
    from the kernel's source: swapping two of them there fails this test."""
    w = NF4Weight.from_bnb(bnb_weight(n, k, seed=n + k + m), backend="cuda")
    assert w.backend == "cuda"
    x = torch.randn(m, k, dtype=torch.float16)
    got = _emulate_cuda_matmul(x, w.packed, w.absmax, w.code_fp16, split_k, tile_groups, slices, kernel)
    ref = nf4_linear_reference(x.double(), w).numpy()
    assert not np.isnan(got).any(), "an output the kernel never writes"
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3


@pytest.mark.parametrize("n, k, m, split_k, tile_groups, slices, kernel", [
    (96, 320, 1, 1, 3, 5, "nf4_matmul"), (224, 448, 8, 2, 2, 8, "nf4_matmul"), (160, 384, 13, 1, 4, 4, "nf4_matmul16"),
    (448, 512, 32, 1, 7, 2, "nf4_matmul32w"), (96, 256, 25, 3, 3, 1, "nf4_matmul32w"), (224, 384, 64, 1, 7, 1, "nf4_matmul64"),
    (64, 576, 40, 2, 1, 4, "nf4_matmul64")])
def test_cuda_swiglu_kernel_emulated(n, k, m, split_k, tile_groups, slices, kernel):
    """The `_swiglu` instances (SiLU(gate) * up in the matmul's epilogue, for the fused gate/up weight)
    on fresh random inputs: output tiles that leave warps half busy (an odd number of output groups
    per CTA), idle warps, K ranges, split-K whose last CTA applies the epilogue to the summed halves;
    against `silu_mul` of the reference matmul, every output written."""
    from mistral_t4.kernels import nf4_cuda
    from mistral_t4.kernels.nf4 import silu_mul

    spec = next(s for s in nf4_cuda.KERNELS if s.name == kernel)
    assert spec.swiglu and -(-tile_groups // (spec.groups // 2)) * slices <= spec.warps
    w = NF4Weight.from_bnb(bnb_weight(n, k, seed=n + k + m + 1), backend="cuda")
    x = torch.randn(m, k, dtype=torch.float16)
    got = _emulate_cuda_matmul(x, w.packed, w.absmax, w.code_fp16, split_k, tile_groups, slices, kernel, swiglu=True)
    ref = silu_mul(nf4_linear_reference(x.double(), w)).numpy()
    assert got.shape == (m, n // 2) and not np.isnan(got).any(), "an output the kernel never writes"
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3


@pytest.mark.parametrize("n, k, m, split_k, tile_groups, slices, variant", [
    (208, 448, 29, 1, 8, 3, (4, 2, 3, 12)), (96, 320, 32, 2, 6, 4, (4, 2, 3, 12)), (112, 576, 20, 1, 2, 5, (4, 2, 3, 12)),
    (240, 384, 64, 1, 8, 2, (8, 2, 2, 8)), (96, 512, 47, 3, 4, 4, (8, 2, 1, 8))])
def test_cuda_template_variants_emulated(n, k, m, split_k, tile_groups, slices, variant):
    """The template's index math for variants bench/experiments/nf4_ranges.py sweeps: 12 warps
    (ranges of 4 and of 2 warps with idle warps left over: 12 is no power of two) and 8 column tiles
    (64 rows, rings of 2 (the package's nf4_matmul64) and 1 block), on fresh random inputs, against the reference."""
    from mistral_t4.kernels import nf4_cuda

    tiles, groups, ring, warps = variant
    assert -(-tile_groups // groups) * slices <= warps, "a geometry the kernel's warps hold (as the sweep proposes)"
    kernel = nf4_cuda.Kernel(f"variant_{tiles}_{groups}_{ring}_{warps}", 8 * tiles, tiles, groups, ring, warps)
    w = NF4Weight.from_bnb(bnb_weight(n, k, seed=n + k + m), backend="cuda")
    x = torch.randn(m, k, dtype=torch.float16)
    got = _emulate_cuda_matmul(x, w.packed, w.absmax, w.code_fp16, split_k, tile_groups, slices, kernel)
    ref = nf4_linear_reference(x.double(), w).numpy()
    assert not np.isnan(got).any(), "an output the kernel never writes"
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted_tests(__file__)


# --- Triton kernels, under TRITON_INTERPRET=1 -------------------------------------------

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
# SHAPES have 5 and 3 blocks along K: the last step's low half is padding.
CONFIGS = [
    None,  # matmul_config's choice
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=3, num_warps=4, num_stages=3),  # uneven split-K
    dict(BLOCK_M=16, BLOCK_N=16, SPLIT_K=8, num_warps=4, num_stages=2),  # empty splits
    dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, num_warps=4, num_stages=2),  # one program per tile
]


@interpreted
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "split3", "split8", "nosplit"])
@pytest.mark.parametrize("rows", [1, 7, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_interpreted_matmul_matches_reference(shape, dtype, rows, config):
    from mistral_t4.kernels import nf4_triton

    w = NF4Weight.from_bnb(bnb_weight(*shape, seed=rows), backend="triton")
    x = torch.randn(rows, shape[1]).to(dtype)
    if config is not None:
        config = {**config, "BLOCK_M": max(16, 1 << (rows - 1).bit_length())}
    out = torch.full((rows, shape[0]), float("nan"), dtype=dtype)
    nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.lookup_table(dtype), w.tile_counters, w.blocksize, out, config)
    assert torch.isfinite(out).all(), "every output element written"
    assert rel_error(out, nf4_linear_reference(x.double(), w)) < TOLERANCE[dtype]
    assert not w.tile_counters.any(), "split-K counters back to zero"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(768, 512)])
def test_interpreted_dequantize_is_exact(shape, dtype):
    from mistral_t4.kernels import nf4_triton

    w = NF4Weight.from_bnb(bnb_weight(*shape), backend="triton")
    out = torch.full(shape, float("nan"), dtype=dtype)
    nf4_triton.nf4_dequantize(w.packed, w.absmax, w.code, w.blocksize, w.in_features, dtype, out)
    assert torch.equal(out, w.dequantize(dtype))


@interpreted
@pytest.mark.parametrize("rows", [1, 32, FUSED_MAX_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_nf4_linear_backend(dtype, rows):
    """The custom op: fused kernel up to FUSED_MAX_ROWS rows, dequantize + matmul above."""
    w = NF4Weight.from_bnb(bnb_weight(96, 320), backend="triton")
    x = torch.randn(2, rows, 320).to(dtype)
    out = nf4_linear(x, w)
    assert out.shape == (2, rows, 96) and out.dtype == dtype
    assert rel_error(out, nf4_linear_reference(x.double(), w)) < TOLERANCE[dtype]


@interpreted
@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("shape", [(768, 512), (512, 1792)], ids=["qkv/8", "down/8"])
def test_interpreted_scaled_mistral_shapes(shape, rows):
    """Mistral's qkv and down projections scaled down 8x: the same block and step structure."""
    from mistral_t4.kernels import nf4_triton

    w = NF4Weight.from_bnb(bnb_weight(*shape), backend="triton")
    x = torch.randn(rows, shape[1], dtype=torch.float16)
    config = nf4_triton.matmul_config(rows, *shape, w.blocksize, sm_count=8)
    out = nf4_triton.nf4_matmul(x, w.packed, w.absmax, w.code_fp16, w.tile_counters, w.blocksize, config=config)
    assert rel_error(out, nf4_linear_reference(x.double(), w)) < TOLERANCE[torch.float16]


# --- The PTX table lookup of the fused kernel, run by a small PTX emulator on CPU -------


def _run_lookup_ptx(ptx: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute the straight-line PTX of `nf4_triton._NF4_LOOKUP_PTX` on 32-bit integers."""
    import numpy as np

    regs = {f"${i}": v for i, v in operands.items()}

    def value(token):
        return regs[token] if token in regs else int(token, 0)

    def prmt(a, b, c):
        source = a | (b << 32)
        out = 0
        for k in range(4):
            sel = (c >> (4 * k)) & 0xF
            byte = (source >> (8 * (sel & 7))) & 0xFF
            if sel & 8:  # sign replication, which the lookup must never trigger
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << (8 * k)
        return out

    def mul_f16x2(a, b):
        halves = np.array([a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16], dtype=np.uint16).view(np.float16)
        product = (halves[:2].astype(np.float32) * halves[2:].astype(np.float32)).astype(np.float16)
        bits = product.view(np.uint16).astype(np.int64)
        return int(bits[0]) | (int(bits[1]) << 16)

    for line in ptx.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        src = [value(a) for a in src]
        if op == "and.b32":
            result = src[0] & src[1]
        elif op == "shr.b32":
            result = src[0] >> src[1]
        elif op == "lop3.b32":
            a, b, c, lut = src
            result = 0
            for bit in range(32):
                index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                result |= ((lut >> index) & 1) << bit
        elif op == "prmt.b32":
            result = prmt(*src)
        elif op == "mul.rn.f16x2":
            result = mul_f16x2(*src)
        else:
            raise AssertionError(f"the emulator lacks {op}")
        regs[dst] = result & 0xFFFFFFFF
    return {int(r[1:]): v for r, v in regs.items() if r.startswith("$")}


def test_lookup_ptx_emulated():
    """The byte-permute lookup gives code[high nibble] * scale and code[low nibble] * scale."""
    import numpy as np

    from mistral_t4.kernels import nf4_triton

    w = NF4Weight.from_bnb(bnb_weight(16, 64), backend="triton")
    bits = w.code_fp16.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    planes = [sum(int((bits[4 * i + j] >> shift) & 0xFF) << (8 * j) for j in range(4)) for shift in (0, 8) for i in range(4)]
    generator = np.random.default_rng(0)
    words = [int(v) for v in generator.integers(0, 2**32, 200)] + [0x01234567, 0x89ABCDEF, 0xFEDCBA98, 0x76543210]
    code = w.code_fp16.numpy()
    for word in words:
        # the asm sees 4 bytes and 4 scales per half, as fp16 pairs: (hi0, hi1), (hi2, hi3), (lo0, lo1), (lo2, lo3)
        scales = generator.standard_normal(8).astype(np.float16)
        scale_words = [int(scales[2 * i : 2 * i + 2].view(np.uint32)[0]) for i in range(4)]
        operands = {4: word, 5: scale_words[0], 6: scale_words[1], 7: scale_words[2], 8: scale_words[3]}
        for i, plane in enumerate(planes):  # each scalar table word fills 4 operands (pack=4)
            for j in range(4):
                operands[9 + 4 * i + j] = plane
        out = _run_lookup_ptx(nf4_triton._NF4_LOOKUP_PTX.value, operands)
        got = np.array([out[r] for r in range(4)], dtype=np.uint32).view(np.float16)  # high nibbles of bytes 0-3, low 0-3
        nibbles = [((word >> (8 * r)) >> 4) & 0xF for r in range(4)] + [(word >> (8 * r)) & 0xF for r in range(4)]
        row_scale = list(scales)
        expected = np.array([np.float16(code[q] * s) for q, s in zip(nibbles, row_scale)], dtype=np.float16)
        assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)), hex(word)
