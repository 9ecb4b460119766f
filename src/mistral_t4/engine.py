"""Our serving engine: ragged prefill, then a compiled one-token decode step for every slot.

Generation has two phases with opposite costs:
- *prefill* runs all prompt tokens at once: big matrix products, compute-bound. Its
  matmuls run eagerly, padded to a multiple of `prefill_bucket` tokens; on CUDA the
  elementwise steps between them run as kernels compiled once for any shape, or ours in
  Triton where the decode step takes ours (`model.fused_ops`).
- *decode* makes one token per running request per step: every weight is read once per
  step for only a few rows of work, so it is bound by memory bandwidth, and at small
  sizes by the launch overhead of ~400 small kernels. It runs over all `max_batch` slots
  with fixed shapes, so on CUDA it is compiled once (`torch.compile`, fullgraph; one decoder
  layer serves all 32, `model.compiled_regions`) and captured as one CUDA graph that is
  replayed each step.

Slots are refilled as requests finish: a waiting request is prefilled into a free slot and
joins the running batch at the next step (continuous batching), so a queue longer than the
batch keeps the GPU busy. Tokens stay on the device between steps; the host reads one
small tensor per step to stream tokens and see which requests have finished.
"""

from __future__ import annotations

import functools
import time

import torch

from mistral_t4 import devices, kernels, sampling
from mistral_t4.cache import CacheFullError, StaticKVCache, round_up
from mistral_t4.model import EAGER_OPS, FastMistral, compiled_regions, fused_ops
from mistral_t4.requests import Request, RequestError, encode_prompt, now, validate
from mistral_t4.sequence import Sequence, eos_ids


class Engine:
    """Continuous-batching engine over a `FastMistral` and a `StaticKVCache`."""

    name = "mistral_t4"

    def __init__(self, model: FastMistral, tokenizer, max_batch: int = 32, max_len: int = 512,
                 compile: bool | None = None, memory_cap_gib: float | None = None,
                 prefill_bucket: int | None = None, max_prefill_tokens: int = 8192,
                 generation_config=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.max_batch = max_batch
        self.cache = StaticKVCache(model.config, max_batch, max_len, model.dtype, self.device, memory_cap_gib)
        model.attach_cache(self.cache)
        self.max_len = self.cache.max_len
        self.adapters = list(model.adapters)
        self.eos_ids = eos_ids(tokenizer, generation_config)
        self.prefill_bucket = prefill_bucket or (128 if self.device.type == "cuda" else 16)
        self.max_prefill_tokens = max(max_prefill_tokens, self.prefill_bucket)
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.active: dict[int, Sequence] = {}  # slot -> sequence
        self.compile_seconds = 0.0
        self.stats = {"prefill_calls": 0, "prefill_tokens": 0, "prefill_padded_tokens": 0, "decode_steps": 0}
        # Per-slot decode state, on the device. Idle slots decode token 0 at position 0.
        batch, device = max_batch, self.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.adapter_ids = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.temperature = torch.zeros(batch, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)
        self.running = torch.zeros(batch, dtype=torch.long, device=device)  # 1 where a slot is in use
        self._in_flight = None  # (host tokens, event, [(slot, sequence)]) of the step not yet read
        pin = device.type == "cuda"
        self._host_tokens = [torch.zeros(batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        # The decode forward: compiled by inductor (CUDA), one decoder layer for all (`compiled_regions`), and
        # captured by us as one CUDA graph at warm-up; plain eager PyTorch on CPU or with compile off.
        self._forward = (functools.partial(model.decode, regions=compiled_regions(model)) if self.compile
                         else model.decode)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        self.use_graph = self.device.type == "cuda" and self.compile
        # Prefill stays eager (its shapes vary) but takes compiled elementwise steps on GPUs, and our Triton
        # kernels for them where the decode step takes ours.
        self.prefill_ops = fused_ops(ours=model.fused_norms) if self.use_graph else EAGER_OPS
        # after a greedy step: argmax, token and position updates in one Triton kernel wherever ours run
        self._greedy_advance = sampling.greedy_advance_reference
        if self.device.type == "cuda" and model.fused_norms:
            from mistral_t4.kernels.greedy_triton import greedy_advance

            self._greedy_advance = greedy_advance

    # ---------------------------------------------------------------- requests

    def prepare(self, request: Request, submitted_at: float | None = None) -> Sequence:
        """Validate and tokenize (on the caller's thread); RequestError if anything is wrong."""
        validate(request, self.adapters)
        prompt_ids = encode_prompt(self.tokenizer, request.prompt)
        try:
            self.cache.check_fits(len(prompt_ids), request.max_new_tokens)
        except CacheFullError as error:
            raise RequestError(str(error)) from None
        return Sequence(request, prompt_ids, self.tokenizer, self.eos_ids, submitted_at or now())

    def free_slots(self) -> int:
        return self.cache.slots.free_count

    def compatible(self, a: Sequence, b: Sequence) -> bool:
        """Any requests can share a batch: sampling settings and adapters are per row."""
        return True

    def admit(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """Prefill `seqs` into free slots.

        Returns (finished already, e.g. max_new_tokens=1; failed with their error). A prefill
        that fails (e.g. out of memory) fails only its own group; running sequences go on.
        """
        if len(seqs) > self.free_slots():
            raise CacheFullError(f"{len(seqs)} sequences for {self.free_slots()} free slots")
        finished, failed = [], []
        for group in self._prefill_groups(seqs):
            try:
                finished += self._prefill(group)
            except Exception as error:  # noqa: BLE001 - reported to each request of the group
                self._release([seq.slot for seq in group if seq.slot is not None and self.active.get(seq.slot) is seq])
                failed += [(seq, error) for seq in group]
        return finished, failed

    def step(self) -> list[Sequence]:
        """One decode step for every running sequence; returns the sequences that finished.

        Pipelined by one step: this call launches step t+1 on the device and only then reads
        step t's tokens (copied to pinned host memory behind an event), so the host's
        bookkeeping overlaps the GPU's work instead of leaving it idle. A request that ended
        at step t got one extra token computed at t+1, which is dropped.
        """
        if not self.active:
            return []
        if self.use_graph and self._graph is None:
            self.warmup()
        logits = self._decode_logits()
        # the step's outputs become the next step's inputs without leaving the device (idle slots stay at position 0)
        if all(seq.request.sampling.greedy for seq in self.active.values()):
            self._greedy_advance(logits, self.tokens, self.positions, self.running)  # one kernel on GPUs
            next_tokens = self.tokens
        else:
            next_tokens = sampling.sample(logits, self.temperature, self.top_k, self.top_p, self.seeds,
                                          self.positions + 1)
            self.tokens.copy_(next_tokens)
            self.positions.add_(self.running)
        self.stats["decode_steps"] += 1
        launched = self._snapshot(next_tokens)
        previous, self._in_flight = self._in_flight, launched
        return self._collect(previous) if previous is not None else []

    def _snapshot(self, next_tokens: torch.Tensor) -> tuple:
        """Start copying a step's tokens to the host; remember which sequence each slot held."""
        if self.device.type == "cuda":
            host = self._host_tokens[self.stats["decode_steps"] % 2]
            host.copy_(next_tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = next_tokens.clone(), None
        return host, event, list(self.active.items())

    def _collect(self, in_flight: tuple) -> list[Sequence]:
        """Hand a finished step's tokens to their sequences; release the ones that are done."""
        host, event, holders = in_flight
        if event is not None:
            event.synchronize()  # waits for that step only, not for the one launched after it
        tokens = host.tolist()
        at = now()
        done = []
        for slot, seq in holders:
            if self.active.get(slot) is not seq:
                continue  # finished in an earlier step; this token is the extra one
            seq.append(tokens[slot], at)
            if seq.done:
                done.append(slot)
        return self._release(done)

    def reset(self) -> list[Sequence]:
        """Drop every running sequence (after a fault) and return them; the cache is reused as is."""
        dropped = self._release(list(self.active))
        self._in_flight = None
        self.running.zero_()
        self.positions.zero_()
        self.tokens.zero_()
        return dropped

    # ---------------------------------------------------------------- warm-up

    def warmup(self) -> float:
        """Compile the decode step and capture it as a CUDA graph, outside any timed region; returns seconds.

        The graph is captured by hand (`torch.cuda.graph`) around the inductor-compiled
        forward, rather than by `mode="reduce-overhead"`: its inputs (tokens, positions,
        adapter ids) are this engine's own tensors, read in place with no copy per replay,
        and a hand-made graph may be replayed from any thread (the worker's), which
        cudagraph trees do not allow in torch < 2.12 (pytorch issue #123177).
        """
        start = time.perf_counter()
        state = self.tokens.clone(), self.positions.clone()  # running sequences' (step() may warm up lazily)
        if self.use_graph:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile + autotune on a side stream, as graph capture requires
                for _ in range(2):
                    self._forward(self.tokens, self.positions, self.adapter_ids)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._graph_logits = self._forward(self.tokens, self.positions, self.adapter_ids)
            self._graph = graph
        elif self.compile:
            self._forward(self.tokens, self.positions, self.adapter_ids)
        if self.prefill_ops is not EAGER_OPS:
            bucket = min(self.prefill_bucket, self.max_len)
            self.model.warm_prefill_ops(self.prefill_ops, tuple(sorted({bucket, min(2 * bucket, self.max_len)})))
            self._warm_prefill(bucket)
        devices.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - start
        self.tokens.copy_(state[0])
        self.positions.copy_(state[1])
        return self.compile_seconds

    @torch.inference_mode()
    def _warm_prefill(self, length: int) -> None:
        """Whole prefills of 1 and 2 dummy prompts into free slots (a real prefill overwrites them),
        so that the first request does not pay the libraries' first calls. Running sequences' slots
        are left alone."""
        free = [slot for slot in range(self.max_batch) if slot not in self.active]
        for n in sorted({1, min(2, len(free))} - {0}):
            tokens = torch.zeros(n, length, dtype=torch.long, device=self.device)
            rows = torch.tensor(free[:n], device=self.device)
            self.model.prefill(tokens, torch.full((n,), length, device=self.device), rows,
                               torch.full((n,), -1, device=self.device), self.prefill_ops)

    # ---------------------------------------------------------------- internals

    def _decode_logits(self) -> torch.Tensor:
        """Logits (max_batch, vocab) of one decode step over every slot: a graph replay on CUDA."""
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        return self._forward(self.tokens, self.positions, self.adapter_ids)

    def _prefill_groups(self, seqs: list[Sequence]):
        """Split into prefill batches of at most max_prefill_tokens padded tokens, similar lengths together."""
        group, longest = [], 0
        for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
            padded = round_up(max(longest, len(seq.prompt_ids)), self.prefill_bucket)
            if group and padded * (len(group) + 1) > self.max_prefill_tokens:
                yield group
                group, longest = [], 0
            group.append(seq)
            longest = max(longest, len(seq.prompt_ids))
        if group:
            yield group

    @torch.inference_mode()
    def _prefill(self, group: list[Sequence]) -> list[Sequence]:
        lengths = [len(seq.prompt_ids) for seq in group]
        padded = min(round_up(max(lengths), self.prefill_bucket), self.max_len)
        rows = torch.zeros(len(group), padded, dtype=torch.long)
        for row, seq in enumerate(group):
            rows[row, : len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        slots = [self.cache.slots.acquire(seq) for seq in group]
        for seq, slot in zip(group, slots):
            seq.slot = slot
            self.active[slot] = seq
        device = self.device
        slot_t = torch.tensor(slots, device=device)
        length_t = torch.tensor(lengths, device=device)
        adapter_t = torch.tensor([self._adapter_index(seq) for seq in group], device=device)
        params = [seq.request.sampling for seq in group]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        seeds = torch.tensor([p.seed for p in params], device=device)
        logits = self.model.prefill(rows.to(device), length_t, slot_t, adapter_t, self.prefill_ops)
        if all(p.greedy for p in params):
            first = sampling.greedy(logits)
        else:
            first = sampling.sample(logits, temperature, top_k, top_p, seeds, length_t)
        # this group's slots join the decode batch
        self.tokens[slot_t] = first
        self.positions[slot_t] = length_t
        self.adapter_ids[slot_t] = adapter_t
        self.temperature[slot_t] = temperature
        self.top_k[slot_t] = top_k
        self.top_p[slot_t] = top_p
        self.seeds[slot_t] = seeds
        self.running[slot_t] = 1
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(lengths)
        self.stats["prefill_padded_tokens"] += padded * len(group)
        at = now()
        for seq, token in zip(group, first.tolist()):
            seq.append(token, at)
        return self._release([seq.slot for seq in group if seq.done])

    def _adapter_index(self, seq: Sequence) -> int:
        name = seq.request.adapter
        return -1 if name is None else self.adapters.index(name)

    def _release(self, slots: list[int]) -> list[Sequence]:
        """Take `slots` out of the decode batch and free them; returns their sequences. One index tensor for all:
        `t[slot] = 0` on a GPU tensor copies the scalar from pageable memory and waits for the stream, so three per
        slot cost the 32-request benchmark ~100 such waits as its requests ended (`torch.profiler`, H100)."""
        if not slots:
            return []
        seqs = [self.active.pop(slot) for slot in slots]
        for slot in slots:
            self.cache.slots.release(slot)
        index = torch.tensor(slots, device=self.device)
        self.adapter_ids.index_fill_(0, index, -1)
        self.running.index_fill_(0, index, 0)
        self.positions.index_fill_(0, index, 0)
        return seqs

    def describe(self) -> dict:
        info = {
            "engine": self.name,
            "max_batch": self.max_batch,
            "cache_len": self.max_len,
            "cache_gib": round(self.cache.nbytes / devices.GIB, 3),
            "compiled": self.compile,
            "prefill_bucket": self.prefill_bucket,
            "kernels": dict(self.model.kernel_choice),
        }
        plans = self.model.nf4_cuda_plans(self.max_batch)
        if plans:  # which CUDA NF4 kernel and grid each projection's decode matmul takes
            info["nf4_cuda_kernels"] = plans
        race = kernels.races().get(f"{self.device}, {self.max_batch} rows")
        if race:  # sm75: the timings that chose between our NF4 kernel and bitsandbytes'
            info["nf4_race_ms"] = race
        info["norms_in_matmuls"] = self.model.folds_norms(self.max_batch)  # the decode step's RMSNorms: NF4 epilogues
        return info

    def kernels_line(self) -> str:
        """One line for a load log: the kernels this engine runs (on a T4 with the NF4 race that chose them)."""
        info = self.describe()
        race = f"; NF4 race, ms per layer: {info['nf4_race_ms']}" if "nf4_race_ms" in info else ""
        norms = "; RMSNorms in the NF4 matmuls' epilogues" if info["norms_in_matmuls"] else ""
        return kernels.describe(info["kernels"]) + norms + race


def make_engine(name: str, model, tokenizer, max_batch: int, max_len: int, compile: bool | None = None,
                memory_cap_gib: float | None = None):
    """Our engine ("mistral_t4") or the HF baseline ("hf") over a loaded model."""
    from mistral_t4.hf_engine import HFEngine
    from mistral_t4.loading import base_model

    if name == "hf":
        return HFEngine(model, tokenizer, max_batch=max_batch, max_len=max_len)
    max_len = min(max_len, base_model(model).config.max_position_embeddings)
    fast = FastMistral.from_hf(model, decode_rows=max_batch)
    return Engine(fast, tokenizer, max_batch=max_batch, max_len=max_len, compile=compile,
                  memory_cap_gib=memory_cap_gib, generation_config=base_model(model).generation_config)
