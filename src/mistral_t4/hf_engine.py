"""The baseline: Hugging Face `generate`, served the way the reference project did.

One worker thread collects whatever requests are waiting (up to `max_batch`), left-pads
them into one batch and calls `generate` once; the batch runs until its longest request is
done, and only then does the next batch start (static batching). `cache="static"` is the
usual "fast" recipe (a static KV cache); `cache="dynamic"` is the default one.

A streamer records when each step's tokens appear, so time to first token and per-token
latency are measured the same way as for our engine, and tokens stream to callbacks.
"""

from __future__ import annotations

import torch

from mistral_t4.loading import base_model
from mistral_t4.requests import Request, RequestError, encode_prompt, now, validate
from mistral_t4.sequence import Sequence, eos_ids


class HFEngine:
    """Static batching over `model.generate`; same interface as `engine.Engine`."""

    def __init__(self, model, tokenizer, max_batch: int = 32, cache: str = "dynamic", compile: bool = False,
                 max_len: int | None = None):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', not {cache!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.cache = cache
        self.compile = compile
        self.name = f"hf-{cache}" + ("-compiled" if compile else "")
        self.device = base_model(model).device
        self.max_len = max_len or base_model(model).config.max_position_embeddings
        adapters = getattr(model, "peft_config", None)
        self.adapters = list(adapters) if adapters else []
        self.eos_ids = eos_ids(tokenizer, base_model(model).generation_config)
        self.active: dict[int, Sequence] = {}
        self.compile_seconds = 0.0
        self._pending: list[Sequence] = []

    def prepare(self, request: Request, submitted_at: float | None = None) -> Sequence:
        validate(request, self.adapters)
        if request.adapter is not None and len(self.adapters) > 1:
            raise RequestError("the HF baseline serves one adapter at a time; use the default engine")
        prompt_ids = encode_prompt(self.tokenizer, request.prompt)
        if len(prompt_ids) + request.max_new_tokens > self.max_len:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {request.max_new_tokens} exceeds "
                f"the limit {self.max_len}"
            )
        return Sequence(request, prompt_ids, self.tokenizer, self.eos_ids, submitted_at or now())

    def free_slots(self) -> int:
        """Static batching: room only when no batch is running."""
        return 0 if self.active else self.max_batch

    def admit(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """Take a batch for the next `generate`; requests that cannot share it with the first fail here."""
        failed = []
        for seq in seqs:
            if self.active and not self.compatible(self.active[0], seq):
                failed.append((seq, RuntimeError("internal: incompatible request in an HF batch")))
                continue
            seq.slot = len(self.active)
            self.active[seq.slot] = seq
        return [], failed

    def compatible(self, a: Sequence, b: Sequence) -> bool:
        """Whether two requests can share one `generate` call (same sampling settings and adapter)."""
        return a.request.sampling == b.request.sampling and a.request.adapter == b.request.adapter

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run `generate` for the whole admitted batch; every sequence finishes."""
        seqs = [self.active[i] for i in sorted(self.active)]
        pad = self.tokenizer.pad_token_id
        width = max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):  # left padding: every row's last prompt token is aligned
            input_ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            attention[row, width - len(seq.prompt_ids):] = 1
        params = seqs[0].request.sampling
        max_new = max(s.request.max_new_tokens for s in seqs)
        kwargs = dict(max_new_tokens=max_new, pad_token_id=pad, streamer=_StepStreamer(seqs))
        if all(s.request.ignore_eos for s in seqs):
            kwargs["min_new_tokens"] = max_new
        if params.temperature > 0 and params.top_k != 1:
            kwargs.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                          top_p=params.top_p)
            torch.manual_seed(params.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.cache == "static":
            kwargs["cache_implementation"] = "static"
        # transformers compiles the static-cache forward on its own on CUDA; say explicitly which we measure
        kwargs["disable_compile"] = not self.compile
        adapter = seqs[0].request.adapter
        if adapter is not None:
            self.model.set_adapter(adapter)
        device = self.device
        self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        finished = [self.active.pop(i) for i in sorted(self.active)]
        for seq in finished:
            if seq.finish_reason is None:
                seq.finish_reason = "length"
        return finished

    def reset(self) -> list[Sequence]:
        dropped = [self.active.pop(i) for i in sorted(self.active)]
        return dropped

    def warmup(self) -> float:
        return 0.0

    def describe(self) -> dict:
        return {"engine": self.name, "max_batch": self.max_batch, "compiled": self.compile,
                "kernels": {"all": "transformers + bitsandbytes"}}


class _StepStreamer:
    """`generate` calls put() with the prompt first, then with each step's new tokens (batch,)."""

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        at = now()
        for seq, token in zip(self.seqs, value.view(-1).tolist()):
            seq.append(token, at)

    def end(self) -> None:
        pass
