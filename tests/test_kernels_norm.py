"""The residual add + RMSNorm: the reference against Hugging Face's RMSNorm, the Triton kernel against the reference.

The Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, see test_kernels_attention.py):
`test_triton_kernel_in_interpreter` reruns this file's `interpreted` tests in a subprocess with it set.
"""

import pytest
import torch

from helpers import INTERPRETED, run_interpreted_tests
from mistral_t4.kernels.norm import add_rms_norm, add_rms_norm_fused, rms_norm

interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernel_in_interpreter")


def random_case(rows, hidden, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    delta = torch.randn(rows, hidden, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype)
    return x, delta, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_huggingface_rms_norm(dtype):
    """`rms_norm` is transformers' MistralRMSNorm bit for bit; `add_rms_norm` adds first, in x's dtype."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    x, delta, weight = random_case(3, 96, dtype)
    hf = MistralRMSNorm(96, eps=1e-5).to(dtype)
    hf.weight.data = weight
    assert torch.equal(rms_norm(x, weight, 1e-5), hf(x))
    total, h = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta) and torch.equal(h, hf(x + delta))


@pytest.mark.parametrize("rows, hidden", [(1, 64), (5, 96), (3, 4096)])
def test_norm_split_around_a_matmul(rows, hidden):
    """`residual_norm_parts` + `rms_scales` (the RMSNorm carried by the NF4 kernels' epilogues): the residual
    sum as `add_rms_norm`'s, the sums of squares per 16 columns, and rms_norm(s) @ W.T == r * ((s * weight) @ W.T)
    to fp32 rounding; `norm_parts` of s alone equals the parts of s + 0."""
    from mistral_t4.kernels.norm import norm_parts, residual_norm_parts, rms_scales

    x, delta, weight = random_case(rows, hidden, torch.float32, seed=hidden)
    w = torch.randn(7, hidden, generator=torch.Generator().manual_seed(1))
    total, xw, sums = residual_norm_parts(x, delta, weight)
    expected_total, h = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, expected_total) and torch.equal(xw, total * weight)
    assert sums.shape == (rows, hidden // 16) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, total.pow(2).view(rows, -1, 16).sum(-1))
    torch.testing.assert_close(rms_scales(sums, 1e-5) * (xw @ w.T), h @ w.T, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(norm_parts(total, weight), (xw, sums)))
    half = [t.half() for t in (x, delta, weight)]  # fp16: the sum and the product rounded as eager, the sums in fp32
    total16, xw16, sums16 = residual_norm_parts(*half)
    assert torch.equal(total16, half[0] + half[1]) and torch.equal(xw16, total16 * half[2])
    assert sums16.dtype == torch.float32


def test_custom_op_on_cpu_is_the_reference():
    """Off CUDA the op runs the reference; its fake implementation and schema pass opcheck."""
    x, delta, weight = random_case(4, 96, torch.float32)
    total, h = add_rms_norm_fused(x, delta, weight, 1e-5)
    expected = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, expected[0]) and torch.equal(h, expected[1])
    torch.library.opcheck(torch.ops.mistral_t4.add_rms_norm, (x, delta, weight, 1e-5))
    torch.library.opcheck(torch.ops.mistral_t4.add_rms_norm, (x, delta, weight, 1e-5, True))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, hidden, x_ready", [(1, 4096, False), (3, 96, True), (5, 40, False), (2, 4096, True)])
def test_interpreted_kernel_matches_reference(dtype, rows, hidden, x_ready):
    """The Triton kernel on fresh random inputs (96, 40: not powers of two): the residual sum exactly, the
    normalized output to one rounding (the kernel sums the squares in another order), outputs poisoned before the
    run; x read before the wait (`x_ready`) or after it."""
    from mistral_t4.kernels import norm_triton

    x, delta, weight = random_case(rows, hidden, dtype, seed=rows + hidden)
    strided = torch.randn(rows, hidden + 8).to(dtype)[:, :hidden]  # a row stride that is not the width
    strided.copy_(delta)
    poisoned = (torch.full_like(x, float("nan")), torch.full((rows, hidden + 3), float("nan"), dtype=dtype)[:, :hidden])
    total, h = norm_triton.add_rms_norm(x, strided, weight, 1e-5, out=poisoned, x_ready=x_ready)
    expected_total, expected_h = add_rms_norm(x, delta, weight, 1e-5)
    assert not total.isnan().any() and not h.isnan().any()
    assert torch.equal(total, expected_total)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(h, expected_h, rtol=tolerance, atol=tolerance)
    again = norm_triton.add_rms_norm(x, delta, weight, 1e-5)  # fresh outputs: the same values
    assert torch.equal(again[0], total) and torch.equal(again[1], h)


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
@pytest.mark.parametrize("capability, pdl", [(75, False), (80, False), (90, True)])
@pytest.mark.parametrize("x_ready", [False, True])
def test_kernel_compiles_for_gpus(capability, pdl, x_ready):
    """The kernel compiled here for sm75 (T4) / sm80 / sm90, with no GPU: on sm90 (programmatic dependent
    launch) it waits for the kernel before it and releases the next one first thing, elsewhere neither; with
    `x_ready` it loads x and the weight before it waits, delta only after."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mistral_t4.kernels import norm_triton

    signature = {**dict.fromkeys(["x_ptr", "delta_ptr", "weight_ptr", "sum_ptr", "h_ptr"], "*fp16"),
                 **dict.fromkeys(["n_cols", "stride_x", "stride_delta", "stride_sum", "stride_h"], "i32"),
                 "eps": "fp32", "BLOCK": "constexpr", "PDL": "constexpr", "X_READY": "constexpr"}
    source = ASTSource(fn=norm_triton._add_rms_norm_kernel, signature=signature,
                       constexprs=dict(BLOCK=4096, PDL=pdl, X_READY=x_ready))
    warps = norm_triton.num_warps(4096)  # the launch of Mistral-7B's rows: one 16-byte vector per thread
    assert warps == 16 and norm_triton.num_warps(1024) == 4 and norm_triton.num_warps(64) == 1
    ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=warps)).asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
    if pdl:  # both before the first load of the inputs, or of delta with x_ready (x's and the weight's go first)
        wait, launch = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
        assert wait < launch and "ld.global" not in ptx[wait:launch]
        before, after = ptx[:wait].count("ld.global"), ptx[wait:].count("ld.global")  # x and weight; delta
        assert (before, after) == ((2 * after, after) if x_ready else (0, after)) and after > 0, (before, after)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted_tests(__file__)
