"""The greedy step's argmax + token / position updates: the Triton kernel against the PyTorch reference.

The kernel runs under Triton's interpreter (TRITON_INTERPRET=1): `test_triton_kernel_in_interpreter` reruns this
file's `interpreted` tests in a subprocess with it set.
"""

import pytest
import torch

from helpers import INTERPRETED, run_interpreted_tests
from mistral_t4.sampling import greedy, greedy_advance_reference

interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernel_in_interpreter")


def case(rows, vocab, dtype, seed):
    """Fresh random logits with the cases an argmax can get wrong planted in some rows: a maximum repeated later in
    the row (also across the kernel's blocks), a row of -inf, rows with NaN (torch takes the first NaN), -0.0 vs 0.0."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator).to(dtype)
    if rows > 1:
        top = logits[1].max() + 1
        logits[1, [3, vocab - 1, vocab // 2]] = top  # three equal maxima: the first index wins
    if rows > 2:
        logits[2] = float("-inf")
    if rows > 3:
        logits[3, [vocab - 2, 5]] = float("nan")
    if rows > 4:
        logits[4] = -1.0
        logits[4, [7, vocab - 3]] = torch.tensor([-0.0, 0.0], dtype=dtype)  # equal: the first
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    positions = torch.randint(0, 100, (rows,), generator=generator)
    running = torch.randint(0, 2, (rows,), generator=generator)
    return logits, tokens, positions, running


def test_reference_is_argmax_and_add():
    logits, tokens, positions, running = case(6, 100, torch.float32, 0)
    expected_positions = positions + running
    greedy_advance_reference(logits, tokens, positions, running)
    assert torch.equal(tokens, greedy(logits)) and torch.equal(positions, expected_positions)
    assert tokens[1] == 3 and tokens[2] == 0 and tokens[3] == 5 and tokens[4] == 7  # torch's own rules, as planted


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, vocab, block", [(1, 1000, None), (6, 1000, 128), (5, 257, 64), (7, 32000, 4096)])
def test_interpreted_kernel_matches_reference(dtype, rows, vocab, block):
    """Several blocks per row (block < vocab, vocab not a multiple of it) and one; the updates in place."""
    from mistral_t4.kernels.greedy_triton import greedy_advance

    logits, tokens, positions, running = case(rows, vocab, dtype, seed=rows + vocab)
    expected = [t.clone() for t in (tokens, positions)]
    greedy_advance_reference(logits, *expected, running)
    tokens.fill_(-7)  # poisoned
    greedy_advance(logits, tokens, positions, running, block=block)
    assert torch.equal(tokens, expected[0]) and torch.equal(positions, expected[1])


@pytest.mark.skipif(INTERPRETED, reason="compiles; the interpreter run cannot")
@pytest.mark.parametrize("capability", [75, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_kernel_compiles_for_gpus(capability, dtype):
    """The launch of Mistral's vocabulary (32000: BLOCK 16384, 16 warps), compiled here with no GPU for a T4 and an
    H100: the row read in 16-byte vectors, the token and the position stored as int64."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mistral_t4.kernels import greedy_triton

    signature = {"logits_ptr": f"*{dtype}", "stride_row": "i32", "vocab": "i32", "tokens_ptr": "*i64",
                 "positions_ptr": "*i64", "running_ptr": "*i64", "BLOCK": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "BLOCK"}  # as launched
    source = ASTSource(fn=greedy_triton._greedy_advance_kernel, signature=signature, constexprs=dict(BLOCK=16384),
                       attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=16)).asm["ptx"]
    assert "ld.global.v4" in ptx and ptx.count("st.global.b64") == 2  # the token and the position


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted_tests(__file__)
