"""Per-row sampling on the device, with no host sync and reproducible seeds.

Every row of a batch carries its own temperature, top-k, top-p and seed as tensors, so one
fixed-shape function samples a mixed batch and can live inside the compiled decode step.

Randomness is counter-based: the noise for (seed, position, token) is a hash of those three
integers (PCG, as in "Hash Functions for GPU Rendering", Jarzynski & Olano 2020). A request
therefore draws the same tokens whatever batch or slot it lands in, and no generator state
has to be carried between steps. Sampling = argmax(logits / T + Gumbel noise) over the
tokens that survive top-k and top-p: the Gumbel-max trick draws from softmax(logits / T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How one request picks its tokens. temperature 0 = greedy; top_k 0 = no limit; top_p 1 = no limit."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _pcg(x: torch.Tensor) -> torch.Tensor:
    """PCG hash of int64 values in [0, 2^32) -> [0, 2^32). Products stay below 2^63."""
    state = (x * 747796405 + 2891336453) & MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & MASK32
    return (word >> 22) ^ word


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) of shape (rows, vocab), a pure function of (seed, position, token id)."""
    row = _pcg((_pcg(seeds & MASK32) ^ (positions.to(torch.int64) & MASK32)) & MASK32)  # (rows,)
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _pcg((row[:, None] + tokens[None, :] * 2654435761) & MASK32)  # (rows, vocab)
    return (bits.to(torch.float64) + 0.5).div(2.0**32).to(torch.float32)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits: (rows, vocab) -> (rows,) token ids."""
    return logits.argmax(dim=-1)


def greedy_advance_reference(logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                             running: torch.Tensor) -> None:
    """A greedy decode step's outputs become the next step's inputs, in place: tokens = `greedy(logits)`,
    positions += running (1 where a slot runs). On GPUs one Triton kernel does both (`kernels.greedy_triton`)."""
    tokens.copy_(greedy(logits))
    positions.add_(running)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row sampling. logits: (rows, vocab) fp32; the rest (rows,). Rows with temperature 0 are greedy.

    Order as in Hugging Face: temperature, then top-k, then top-p over what top-k kept.
    """
    rows, vocab = logits.shape
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    sorted_logits, _ = scaled.sort(dim=-1, descending=True)  # (rows, vocab)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)[:, None]  # (rows, 1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (mass_before < top_p[:, None]) & (rank < k)
    n_keep = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # the top token always survives
    threshold = sorted_logits.gather(1, n_keep - 1)  # smallest logit kept
    filtered = scaled.masked_fill(scaled < threshold, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, vocab)))
    drawn = (filtered + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, logits.argmax(dim=-1))
