"""One request while it is being served: its tokens so far, its text, when each token came, why it stopped.

Both engines (ours and the Hugging Face baseline) keep their running requests as `Sequence`s,
so stopping rules, streaming and results are the same whichever engine produced the tokens.
"""

from __future__ import annotations

from mistral_t4.requests import Detokenizer, EngineError, Request, RequestError, Result, now


class Sequence:
    def __init__(self, request: Request, prompt_ids: list[int], tokenizer, eos_ids: frozenset[int],
                 submitted_at: float):
        self.request = request
        self.eos_ids = eos_ids
        self.prompt_ids = prompt_ids
        self.tokenizer = tokenizer
        self.submitted_at = submitted_at
        self.tokens: list[int] = []
        self.token_times: list[float] = []
        self.finish_reason: str | None = None
        self.slot: int | None = None
        # why this sequence failed on its own (its on_token callback raised, its text would not decode);
        # the worker hands it to this request's future, the rest of the batch goes on
        self.error: Exception | None = None
        # text is only needed to stream it or to look for stop strings
        needs_text = request.on_token is not None or bool(request.stop)
        self.detokenizer = Detokenizer(tokenizer, prompt_ids) if needs_text else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, at: float | None = None) -> None:
        """Record one generated token; decide whether the sequence is finished."""
        if self.done:
            return
        request = self.request
        self.tokens.append(token)
        self.token_times.append(now() if at is None else at)
        try:
            delta = self.detokenizer.add(token) if self.detokenizer is not None else ""
        except Exception as error:  # noqa: BLE001 - fails this request only, not the batch
            self._fail(EngineError(f"could not decode generated token {token} ({type(error).__name__}: {error})"))
            return
        if not request.ignore_eos and token in self.eos_ids:
            self.finish_reason = "eos"
        elif request.stop and any(s in self.detokenizer.text for s in request.stop):
            self.finish_reason = "stop"
        elif len(self.tokens) >= request.max_new_tokens:
            self.finish_reason = "length"
        if request.on_token is not None:
            try:
                request.on_token(token, delta)
            # BaseException too: a callback that calls sys.exit() must not take the worker thread down
            except BaseException as error:  # noqa: BLE001 - the caller's bug ends only its own request
                self._fail(RequestError(f"on_token callback raised {type(error).__name__}: {error}"))

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.finish_reason = "error"

    def result(self) -> Result:
        tokens = self.tokens
        if self.finish_reason == "eos":
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.finish_reason == "stop":
            cut = min((text.find(s) for s in self.request.stop if s in text), default=len(text))
            text = text[:cut]
        return Result(
            request_id=self.request.id,
            prompt_tokens=len(self.prompt_ids),
            tokens=list(self.tokens),
            text=text,
            finish_reason=self.finish_reason or "length",
            submitted_at=self.submitted_at,
            first_token_at=self.token_times[0] if self.token_times else now(),
            finished_at=self.token_times[-1] if self.token_times else now(),
            token_times=list(self.token_times),
        )


def eos_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """Token ids that end generation: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    if extra is not None:
        ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return frozenset(ids)
