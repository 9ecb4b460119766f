"""Static KV cache: every key and value the model will ever need, allocated once.

Hugging Face's default cache grows a tensor per layer at every step (a new allocation and
a copy); a static cache is allocated for (max_batch, max_len) up front and written by
index, so the decode step always sees tensors of the same shape at the same addresses.
That is what lets it be compiled once and replayed as a CUDA graph.

Each batch row is a *slot*. A request owns a slot from its prefill until it finishes; its
keys and values for position p live at [:, slot, :, p]. `max_len` is rounded up to a
multiple of 128 so sizes line up with kernel tiles and graphs are shared between runs.

Size: 2 (K and V) x layers x max_batch x kv_heads x max_len x head_dim x bytes. For
Mistral-7B in fp16 with 32 slots of 256 tokens: 2 x 32 x 32 x 8 x 256 x 128 x 2 B = 1 GiB.
"""

from __future__ import annotations

import heapq

import torch
from torch import nn

from mistral_t4 import devices

ALIGN = 128


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def cache_bytes(config, max_batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes a cache of (max_batch, round_up(max_len)) takes for `config`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * max_batch * round_up(max_len) * torch.empty((), dtype=dtype).element_size()


def _what_fits(bytes_per_token: int, max_batch: int, max_len: int, budget: int) -> str:
    """Say which smaller cache would fit `budget`: fewer slots at this length, or shorter slots at this batch."""
    slots = max(budget, 0) // (bytes_per_token * max_len)
    length = max(budget, 0) // (bytes_per_token * max_batch) // ALIGN * ALIGN
    options = []
    if slots >= 1:
        options.append(f"max_batch={slots} at max_len={max_len}")
    if length >= ALIGN:
        options.append(f"max_len={length} at max_batch={max_batch}")
    if not options:
        return f"not even one slot of {ALIGN} tokens fits; free memory (smaller model, nf4) or raise the cap"
    return "would fit: " + " or ".join(options)


def write_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """Store one new key/value per slot of one layer's cache at its position.
    k_cache, v_cache: (max_batch, n_kv_heads, max_len, head_dim); positions: (max_batch,); k, v: (max_batch,
    n_kv_heads, head_dim)."""
    rows = torch.arange(k_cache.shape[0], device=positions.device)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v


class CacheFullError(ValueError):
    """A request that does not fit the cache (too long, or no free slot)."""


class StaticKVCache(nn.Module):
    """Keys and values of every layer for `max_batch` slots of `max_len` positions.

    k[layer], v[layer]: (max_batch, n_kv_heads, max_len, head_dim), one separate buffer per
    layer. Separate, not views of one big tensor: the compiler writes a new key into a
    buffer in place, but a write through a view of a larger tensor it turns into a copy of
    the whole cache every step (measured: 13 ms of a 19 ms step at batch 32 on an H200).
    Slot bookkeeping (which slots are free) lives on the host in `SlotTable`.
    """

    def __init__(self, config, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 memory_cap_gib: float | None = None):
        super().__init__()
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"cache needs max_batch >= 1 and max_len >= 1, got {max_batch} and {max_len}")
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise CacheFullError(f"max_len {max_len} exceeds the model's max_position_embeddings {limit}")
        self.max_batch = max_batch
        self.max_len = round_up(max_len)
        self.n_layers = config.num_hidden_layers
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        needed = cache_bytes(config, max_batch, self.max_len, dtype)
        budget = devices.memory_budget_bytes(device, memory_cap_gib)
        if budget is not None and needed > budget:
            raise MemoryError(
                f"the KV cache for {max_batch} x {self.max_len} tokens needs {needed / devices.GIB:.2f} GiB, "
                f"only {budget / devices.GIB:.2f} GiB is free{' under the cap' if memory_cap_gib else ''}; "
                + _what_fits(needed // (max_batch * self.max_len), max_batch, self.max_len, budget)
            )
        shape = (max_batch, self.n_kv_heads, self.max_len, self.head_dim)
        for layer in range(self.n_layers):
            self.register_buffer(f"k{layer}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{layer}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.slots = SlotTable(max_batch)

    @property
    def k(self) -> list[torch.Tensor]:
        return [getattr(self, f"k{layer}") for layer in range(self.n_layers)]

    @property
    def v(self) -> list[torch.Tensor]:
        return [getattr(self, f"v{layer}") for layer in range(self.n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers())

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a request that would run past the end of its slot."""
        need = prompt_len + max_new_tokens
        if need > self.max_len:
            fix = (f"at most {self.max_len - prompt_len} new tokens fit after this prompt; lower max_new_tokens"
                   if prompt_len < self.max_len else
                   "the prompt alone does not fit (prompts are never truncated); shorten it")
            raise CacheFullError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {need} exceeds the "
                f"cache length {self.max_len}: {fix} or build the engine with a larger max_len"
            )

    def write_prefill(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values of positions 0..T-1 for `slots`. k, v: (n, n_kv_heads, T, head_dim)."""
        length = k.shape[2]
        getattr(self, f"k{layer}")[slots, :, :length] = k
        getattr(self, f"v{layer}")[slots, :, :length] = v

class SlotTable:
    """Host-side record of which cache slots are free; never double-books or leaks a slot.

    `acquire` hands out the lowest free slot, so which slots a batch gets depends only on which are
    in use, not on the order earlier ones were released in: a run replays the same way after `reset`."""

    def __init__(self, n: int):
        self.n = n
        self._free = list(range(n))  # a heap: heappop() gives the lowest free slot
        self._owner: dict[int, object] = {}

    def acquire(self, owner) -> int:
        if not self._free:
            raise CacheFullError("no free cache slot")
        slot = heapq.heappop(self._free)
        self._owner[slot] = owner
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._owner:
            raise KeyError(f"slot {slot} is not in use")
        del self._owner[slot]
        heapq.heappush(self._free, slot)

    def owner(self, slot: int):
        return self._owner.get(slot)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used(self) -> dict[int, object]:
        return dict(self._owner)
