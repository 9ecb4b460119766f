"""Prefill's elementwise steps as Triton kernels (`kernels/prefill_triton.py`, and the add + RMSNorm kernel
over rows) against the eager references, under Triton's interpreter (TRITON_INTERPRET=1, see
test_kernels_attention.py): `test_triton_kernel_in_interpreter` reruns this file's `interpreted` tests
in a subprocess with it set. The kernels also compile for sm80 / sm90 here, with no GPU.
"""

import pytest
import torch

from helpers import INTERPRETED, run_interpreted_tests

interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernel_in_interpreter")


def qkv_case(n, length, q_heads, k_heads, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, length, (q_heads + 2 * k_heads) * head_dim, generator=generator).to(dtype)
    q = qkv[..., : q_heads * head_dim].view(n, length, q_heads, head_dim).transpose(1, 2)
    k = qkv[..., q_heads * head_dim: (q_heads + k_heads) * head_dim].view(n, length, k_heads, head_dim).transpose(1, 2)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), torch.rand(head_dim // 2, generator=generator))
    emb = torch.cat([angles, angles], dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, length, q_heads, k_heads, head_dim", [(2, 5, 4, 2, 32), (1, 3, 6, 3, 16), (3, 1, 4, 1, 8)])
def test_interpreted_rotate_qk_matches_reference(dtype, n, length, q_heads, k_heads, head_dim):
    """Rotary on q and k straight from the qkv projection's output (strided views; head counts that are not
    powers of two): the same values as the eager reference bit for bit, in the (n, heads, T, head_dim) shape."""
    from mistral_t4.kernels import prefill_triton
    from mistral_t4.model import rotate_qk

    q, k, cos, sin = qkv_case(n, length, q_heads, k_heads, head_dim, dtype, seed=n + length + q_heads)
    got_q, got_k = prefill_triton.rotate_qk(q, k, cos, sin)
    expected_q, expected_k = rotate_qk(q, k, cos, sin)
    assert got_q.shape == q.shape and got_k.shape == k.shape
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 80), (1, 5, 2 * 1100), (7, 2 * 1024)])  # one, two and an exact number of blocks
def test_interpreted_silu_mul_matches_reference(dtype, shape):
    """SiLU(gate) * up of the fused gate/up output against `nf4.silu_mul`: the exp of the interpreter (numpy)
    and of torch on CPU may differ in the last bit (so does the order of torch's CPU silu), so within a rounding."""
    from mistral_t4.kernels import prefill_triton
    from mistral_t4.kernels.nf4 import silu_mul

    gate_up = (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))).to(dtype)
    got = prefill_triton.silu_mul(gate_up)
    expected = silu_mul(gate_up)
    assert got.shape == expected.shape and not got.isnan().any()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float16:  # rounded to fp16, the last-bit differences of exp rarely show
        assert (got == expected).float().mean() > 0.99


@interpreted
def test_interpreted_add_rms_norm_over_rows():
    """The decode step's add + RMSNorm kernel over every (prompt, position) row of prefill's (n, T, hidden)."""
    from mistral_t4.kernels.norm import add_rms_norm
    from mistral_t4.kernels.prefill_triton import add_rms_norm_rows as _add_rms_norm_rows

    generator = torch.Generator().manual_seed(3)
    x, delta = (torch.randn(2, 3, 96, generator=generator).half() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(96, generator=generator)).half()
    total, h = _add_rms_norm_rows(x, delta, weight, 1e-5)
    expected_total, expected_h = add_rms_norm(x, delta, weight, 1e-5)
    assert total.shape == h.shape == x.shape and torch.equal(total, expected_total)
    torch.testing.assert_close(h, expected_h, rtol=2e-3, atol=2e-3)


def test_prefill_ops_choice():
    """`fused_ops(ours=True)` (where the decode step takes our Triton kernels) runs those three steps by our
    kernels and compiles the rest; plain `fused_ops()` compiles all four."""
    from mistral_t4.kernels import prefill_triton
    from mistral_t4.kernels.prefill_triton import add_rms_norm_rows as _add_rms_norm_rows
    from mistral_t4.model import EAGER_OPS, fused_ops

    ours = fused_ops(ours=True)
    assert ours.rotate_qk is prefill_triton.rotate_qk and ours.silu_mul is prefill_triton.silu_mul
    assert ours.add_rms_norm is _add_rms_norm_rows and ours.rms_norm is not EAGER_OPS.rms_norm
    assert all(getattr(fused_ops(), name) not in (prefill_triton.rotate_qk, prefill_triton.silu_mul, _add_rms_norm_rows)
               for name in vars(EAGER_OPS))


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
@pytest.mark.parametrize("capability", [75, 80, 90])
def test_kernels_compile_for_gpus(capability):
    """Both kernels compile for sm75 (T4) / sm80 / sm90 with no GPU: the rotary kernel without multiply-add
    contraction (its products rounded as eager rounds them), SiLU with an IEEE division."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mistral_t4.kernels import prefill_triton

    target = GPUTarget("cuda", capability, 32)
    signature = {**dict.fromkeys(["q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "cos_ptr", "sin_ptr"], "*fp16"),
                 **dict.fromkeys(["length", "stride_qn", "stride_qh", "stride_qt", "stride_kn", "stride_kh", "stride_kt",
                                  "q_heads", "k_heads"], "i32"),
                 **dict.fromkeys(["Q_PAD", "K_PAD", "HEAD_DIM"], "constexpr")}
    source = ASTSource(fn=prefill_triton._rotate_qk_kernel, signature=signature,
                       constexprs=dict(Q_PAD=32, K_PAD=8, HEAD_DIM=128))
    ptx = triton.compile(source, target=target, options=dict(num_warps=4, enable_fp_fusion=False)).asm["ptx"]
    assert "mul.rn.f" in ptx and "fma." not in ptx  # (Triton may take x * cos in fp16: one rounding either way)
    signature = {"x_ptr": "*fp16", "out_ptr": "*fp16", "half": "i32", "stride_x": "i32", "stride_out": "i32",
                 "BLOCK": "constexpr"}
    source = ASTSource(fn=prefill_triton._silu_mul_kernel, signature=signature, constexprs=dict(BLOCK=1024))
    ptx = triton.compile(source, target=target, options=dict(num_warps=4)).asm["ptx"]
    assert "div.rn.f32" in ptx and "ex2.approx" in ptx


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted_tests(__file__)
