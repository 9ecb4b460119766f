"""Triton kernel for a greedy step's updates, `greedy_advance` (reference: `sampling.greedy_advance_reference`).

After each decode step whose rows all decode greedily, the engine turns the logits into the next step's
inputs: tokens = argmax of each row, positions += 1 where a slot runs. In PyTorch that is three launches
(argmax, a copy, an add; at 1 row on an H100 the argmax alone took 10.5 us, a single block reading the
row) with a gap before each; here it is one, a program per row reading its row in blocks of BLOCK
values. The argmax is torch's: the first index of the maximum, and a row with NaN gives its first NaN
(torch orders NaN above every number).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_advance_kernel(logits_ptr, stride_row, vocab, tokens_ptr, positions_ptr, running_ptr,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    best = float("-inf")
    best_index = 0
    first_nan = vocab
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        values = tl.load(base + offsets, mask=offsets < vocab, other=float("-inf")).to(tl.float32)
        is_nan = values != values
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, offsets, vocab), axis=0))
        values = tl.where(is_nan, float("-inf"), values)
        block_max = tl.max(values, axis=0)
        block_index = tl.min(tl.where(values == block_max, offsets, vocab), axis=0)  # its first occurrence
        take = block_max > best  # strictly: an equal maximum of a later block keeps the earlier index
        best_index = tl.where(take, block_index, best_index)
        best = tl.where(take, block_max, best)
    token = tl.where(first_nan < vocab, first_nan, best_index)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(positions_ptr + row, tl.load(positions_ptr + row) + tl.load(running_ptr + row))


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, running: torch.Tensor,
                   block: int | None = None) -> None:
    """tokens[r] = argmax(logits[r]) and positions[r] += running[r], in place, one launch. logits: (rows, vocab)
    with unit stride along the vocabulary; tokens, positions, running: (rows,) int64, contiguous."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and tokens.shape == positions.shape == running.shape == (rows,)
    assert tokens.dtype == positions.dtype == running.dtype == torch.int64
    assert tokens.is_contiguous() and positions.is_contiguous() and running.is_contiguous()
    block = block or min(triton.next_power_of_2(vocab), 16384)
    _greedy_advance_kernel[(rows,)](logits, logits.stride(0), vocab, tokens, positions, running, BLOCK=block,
                                    num_warps=16 if block >= 8192 else 4)
