"""Decode attention: the reference against a naive loop, the Triton kernel against the reference.

The Triton kernel runs under Triton's interpreter, chosen when Triton decorates a kernel,
i.e. when TRITON_INTERPRET=1 is set before `attention_triton` is imported.
`test_triton_kernel_in_interpreter` therefore reruns this file's `interpreted` tests in a
subprocess with it set; in the normal run they are skipped.
"""

import pytest
import torch

from helpers import INTERPRETED, run_interpreted_tests
from mistral_t4.kernels import decode_attention, decode_attention_reference
from mistral_t4.kernels.attention import decode_attention_rotary, decode_attention_rotary_reference

interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernel_in_interpreter")

MAX_LEN = 100  # not a multiple of any tile length
LENGTHS = [0, MAX_LEN, 1, 37, 64, 65]  # idle slot, full cache, ragged rows


def random_case(group, n_kv_heads=2, head_dim=32, dtype=torch.float32, lengths=LENGTHS, seed=0):
    """q, k_cache, v_cache, lengths; the cache has one spare row beyond the batch."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch + 1, n_kv_heads, MAX_LEN, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch + 1, n_kv_heads, MAX_LEN, head_dim, generator=generator).to(dtype)
    return q, k, v, torch.tensor(lengths, dtype=torch.int32)


def naive_attention(q, k_cache, v_cache, lengths, scale, sliding_window=None):
    """Row by row, head by head, with K/V repeated to every query head."""
    batch, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[1]
    k = k_cache[:batch].repeat_interleave(group, dim=1).double()  # (batch, n_heads, max_len, head_dim)
    v = v_cache[:batch].repeat_interleave(group, dim=1).double()
    out = torch.zeros(batch, n_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        end = int(lengths[b])
        start = 0 if sliding_window is None else max(0, end - sliding_window)
        for h in range(n_heads):
            if end == 0:
                continue
            scores = k[b, h, start:end] @ q[b, h].double() * scale
            out[b, h] = torch.softmax(scores, dim=0) @ v[b, h, start:end]
    return out


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("sliding_window", [None, 5, 64, 1000])
@pytest.mark.parametrize("group", [1, 4])
def test_reference_matches_naive_loop(group, sliding_window):
    q, k, v, lengths = random_case(group)
    scale = q.shape[-1] ** -0.5
    out = decode_attention_reference(q, k, v, lengths, scale, sliding_window)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = naive_attention(q, k, v, lengths, scale, sliding_window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_idle_rows_are_zero():
    q, k, v, lengths = random_case(4, lengths=[0, 0, 3])
    out = decode_attention_reference(q, k, v, lengths, 0.1)
    assert torch.isfinite(out).all()
    assert not out[:2].any() and out[2].any()


def test_decode_attention_on_cpu_is_the_reference():
    q, k, v, lengths = random_case(4)
    expected = decode_attention_reference(q, k, v, lengths, 0.2, 16)
    assert torch.equal(decode_attention(q, k, v, lengths, 0.2, 16), expected)


POSITIONS = [0, MAX_LEN - 1, 36, 63, 64, 5]  # the new token's position per row: first, last, tile edges


def rotary_case(group, n_kv_heads=2, head_dim=32, dtype=torch.float32, positions=POSITIONS, seed=0):
    """qkv of the new tokens, a cache with one spare row, positions, and cos / sin tables as the model's."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(positions)
    qkv = torch.randn(batch, (n_kv_heads * group + 2 * n_kv_heads) * head_dim, generator=generator).to(dtype)
    k = torch.randn(batch + 1, n_kv_heads, MAX_LEN, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch + 1, n_kv_heads, MAX_LEN, head_dim, generator=generator).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = torch.outer(torch.arange(MAX_LEN, dtype=torch.float), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return qkv, k, v, torch.tensor(positions), emb.cos().to(dtype), emb.sin().to(dtype)


def naive_rotate(x, cos, sin):
    """x (..., head_dim) as pairs (d, d + half) turned by the angle of d: (a, b) -> (a c - b s, b c + a s)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos[..., :half] - b * sin[..., :half], b * cos[..., half:] + a * sin[..., half:]), dim=-1)


@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("group", [1, 4])
def test_rotary_reference_matches_naive(group, sliding_window):
    """Rotated q and k, the cache written at each row's position only, attention over 0 .. position."""
    qkv, k, v, positions, cos, sin = rotary_case(group)
    n_heads, n_kv_heads, head_dim = 2 * group, 2, 32
    k_before, v_before = k.clone(), v.clone()
    out = decode_attention_rotary_reference(qkv, k, v, positions, cos, sin, n_heads, 0.2, sliding_window)
    batch = len(POSITIONS)
    q_new = qkv[:, :n_heads * head_dim].view(batch, n_heads, head_dim).double()
    k_new = qkv[:, n_heads * head_dim:(n_heads + n_kv_heads) * head_dim].view(batch, n_kv_heads, head_dim).double()
    v_new = qkv[:, (n_heads + n_kv_heads) * head_dim:].view(batch, n_kv_heads, head_dim)
    c, s = cos[positions].double()[:, None], sin[positions].double()[:, None]
    k_expected, v_expected = k_before.clone().double(), v_before.clone()
    for b, p in enumerate(POSITIONS):
        k_expected[b, :, p] = naive_rotate(k_new[b], c[b], s[b])
        v_expected[b, :, p] = v_new[b]
    torch.testing.assert_close(k.double(), k_expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, v_expected), "v written unchanged at each position, nothing else touched"
    lengths = positions.to(torch.int32) + 1
    expected = naive_attention(naive_rotate(q_new, c, s), k_expected, v_expected, lengths, 0.2, sliding_window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_on_cpu_is_the_reference():
    qkv, k, v, positions, cos, sin = rotary_case(4)
    k2, v2 = k.clone(), v.clone()
    expected = decode_attention_rotary_reference(qkv, k, v, positions, cos, sin, 8, 0.2, 16)
    assert torch.equal(decode_attention_rotary(qkv, k2, v2, positions, cos, sin, 8, 0.2, 16), expected)
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_pdl_launch_options(monkeypatch):
    """Our Triton kernels' launch options: PDL (and Triton's launch_pdl) exactly where `early_launch` says so."""
    pytest.importorskip("triton")
    from mistral_t4.kernels import attention_triton

    assert attention_triton.pdl_options("cpu") == {"PDL": False}
    monkeypatch.setattr(attention_triton, "early_launch", lambda device: True)
    assert attention_triton.pdl_options("cuda") == {"PDL": True, "launch_pdl": True}


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
@pytest.mark.parametrize("capability, pdl", [(80, False), (90, True)])
def test_kernels_compile_for_gpus(capability, pdl):
    """Both attention kernels (rotary mode, with splits) compiled here for sm80 / sm90, with no GPU: on
    sm90 (programmatic dependent launch) each waits for the kernel before it and releases the next one (the
    attention kernel after its loop, the merge first thing); on sm80 neither. Before its wait the attention kernel
    loads only its row's position and its first tile of earlier cache entries (64 positions of K and V, 128 x 2
    halves per thread of 4 warps here, where no stride hints let Triton widen the loads) and stores nothing; the
    merge loads nothing."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mistral_t4.kernels import attention_triton

    types = {"lengths_ptr": "*i32", "scale_log2e": "fp32"}
    types.update(dict.fromkeys(["split_acc_ptr", "split_max_ptr", "split_sum_ptr"], "*fp32"))
    constants = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_L=64, NUM_SPLITS=4, DOT_PRECISION="tf32", ROTARY=True,
                     PDL=pdl, SPLITS_PAD=4)
    for kernel in (attention_triton._decode_attention_kernel, attention_triton._combine_splits_kernel):
        signature = {name: "constexpr" if name in constants else types.get(name, "*fp16" if name.endswith("_ptr") else "i32")
                     for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={name: value for name, value in constants.items() if name in signature})
        ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=4)).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl, kernel
        if pdl:
            before = ptx[:ptx.index("griddepcontrol.wait")]
            assert "st.global" not in before
            assert before.count("ld.global") == (1 + 2 * 64 * 128 // 128 if kernel.fn.__name__ == "_decode_attention_kernel"
                                                 else 0), kernel


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted_tests(__file__)


# --- the Triton kernel, under TRITON_INTERPRET=1 -----------------------------------------

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@interpreted
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_kernel_matches_reference(dtype, group, sliding_window, num_splits):
    from mistral_t4.kernels import attention_triton

    q, k, v, lengths = random_case(group, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    out = torch.full_like(q, float("nan"))
    attention_triton.decode_attention(q, k, v, lengths, scale, sliding_window, out, num_splits, block_len=32)
    assert torch.isfinite(out).all(), "every output element written, idle rows included"
    assert not out[0].any(), "an idle slot gives zeros"
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, scale, sliding_window)
    assert rel_error(out, ref) < TOLERANCE[dtype]


@interpreted
def test_interpreted_kernel_many_small_splits():
    """As many splits as the default gives a lone row (chunks of a few tiles, some past every length)."""
    from mistral_t4.kernels import attention_triton

    q, k, v, lengths = random_case(4, dtype=torch.float16)
    out = attention_triton.decode_attention(q, k, v, lengths, 0.2, None, num_splits=7, block_len=16)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, 0.2)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


def test_default_split_rule():
    """One split once rows x KV heads fill the SMs; else ~4 programs per SM, chunks >= 64, <= 32 splits."""
    attention_triton = pytest.importorskip("mistral_t4.kernels.attention_triton")
    rule = attention_triton.default_num_splits
    assert rule(32 * 8, 256, 132) == rule(32 * 8, 4096, 132) == 1  # W32 on an H100 / H200
    assert rule(8, 512, 132) == 8 and rule(8, 4096, 132) == 32  # batch 1: cache length and the cap bind
    assert rule(32, 2048, 132) == 17 and rule(64, 1024, 132) == 9
    assert rule(8, 64, 132) == 1 and rule(8, 100, 132) == 2  # short caches: chunks of 64 positions at least


@interpreted
def test_interpreted_kernel_reads_strided_q():
    """q as the model produces it: a slice of a fused projection output, rows not contiguous."""
    from mistral_t4.kernels import attention_triton

    _, k, v, lengths = random_case(4, dtype=torch.float16)
    fused = torch.randn(len(LENGTHS), 3 * 8, 32, dtype=torch.float16)
    q = fused[:, :8]  # (batch, n_heads, head_dim), batch stride 3x larger than contiguous
    out = attention_triton.decode_attention(q, k, v, lengths, 0.2, None, num_splits=2, block_len=16)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, 0.2)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


@interpreted
def test_interpreted_custom_op_defaults():
    """The launcher with its default tile sizes and split count, through the custom op."""
    q, k, v, lengths = random_case(4, dtype=torch.float16)
    out = torch.ops.mistral_t4.decode_attention(q, k, v, lengths, 0.2, 30)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, 0.2, 30)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


@interpreted
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_rotary_kernel_matches_reference(dtype, group, sliding_window, num_splits):
    """One launch against rotate + indexed cache write + reference attention: the same cache after it
    (v bit for bit; k to rounding), the same output; a spare cache row and other positions untouched."""
    from mistral_t4.kernels import attention_triton

    qkv, k, v, positions, cos, sin = rotary_case(group, dtype=dtype)
    k_ref, v_ref = k.clone(), v.clone()
    n_heads = 2 * group
    ref = decode_attention_rotary_reference(qkv, k_ref, v_ref, positions, cos, sin, n_heads, 0.2, sliding_window)
    out = torch.full((len(POSITIONS), n_heads, 32), float("nan"), dtype=dtype)
    attention_triton.decode_attention_rotary(qkv, k, v, positions, cos, sin, n_heads, 0.2, sliding_window, out,
                                             num_splits, block_len=16)
    assert torch.equal(v, v_ref)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < TOLERANCE[dtype]


@interpreted
def test_interpreted_rotary_custom_op_defaults():
    """Through the custom op with default tiles and splits, qkv a slice of a wider buffer (strided rows)."""
    qkv, k, v, positions, cos, sin = rotary_case(4, dtype=torch.float16)
    wide = torch.zeros(qkv.shape[0], qkv.shape[1] + 8, dtype=qkv.dtype)
    wide[:, :qkv.shape[1]] = qkv
    k_ref, v_ref = k.clone(), v.clone()
    ref = decode_attention_rotary_reference(qkv, k_ref, v_ref, positions, cos, sin, 8, 0.2, 30)
    out = torch.ops.mistral_t4.decode_attention_rotary(wide[:, :qkv.shape[1]], k, v, positions, cos, sin, 8, 0.2, 30)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]
