"""What a caller asks for (`Request`), what it gets back (`Result`), and the checks in between.

Every submitted request ends in exactly one `Result` or one exception on its future; the
exception types below say whose fault it was: `RequestError` for bad input (nothing was
run), `EngineError` for a failure while serving it (the batch it was in failed).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from mistral_t4.sampling import SamplingParams

_ids = itertools.count(1)
INT64_MAX = 2**63 - 1  # top_k and seed become int64 tensors; a bigger int would fail inside a batch


class RequestError(ValueError):
    """The request itself is invalid; the message says what was wrong."""


class EngineError(RuntimeError):
    """The engine failed while serving this request (e.g. out of memory); the worker went on."""


class ShutdownError(RuntimeError):
    """The worker was shut down before this request could finish."""


@dataclass
class Request:
    """One generation request.

    prompt: text (tokenized with special tokens), a list of token ids, or chat messages
    ([{"role": ..., "content": ...}], formatted with the tokenizer's chat template).
    """

    prompt: str | list[int] | list[dict]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    adapter: str | None = None
    on_token: Callable[[int, str], None] | None = None  # called with (token id, new text) as tokens arrive
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Result:
    request_id: int
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str  # "length" | "eos" | "stop" | "cancelled" | "timeout"
    submitted_at: float
    first_token_at: float
    finished_at: float
    token_times: list[float]  # host clock when each token became known

    @property
    def time_to_first_token(self) -> float:
        return self.first_token_at - self.submitted_at

    @property
    def latency(self) -> float:
        return self.finished_at - self.submitted_at

    @property
    def inter_token_latencies(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]


def _check_text(text: str, what: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates, e.g. from bytes decoded with
    errors="surrogateescape"): the tokenizer would fail on it with an unhelpful TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise RequestError(
            f"{what} is not valid Unicode text: lone surrogate {bad!r} at index {error.start} cannot be encoded "
            "as UTF-8 (decode bytes with errors='replace')"
        ) from None


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt -> token ids, or RequestError saying what is wrong with it. Never truncates."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RequestError("prompt is empty")
        _check_text(prompt, "prompt")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif isinstance(prompt, (bytes, bytearray)):
        raise RequestError("prompt is bytes; decode it to str first (e.g. data.decode('utf-8', errors='replace'))")
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        for message in prompt:
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise RequestError("chat messages need string 'role' and 'content' fields")
            _check_text(message["content"], f"the content of a {message['role']!r} message")
            _check_text(message["role"], "a message role")
        try:
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        except Exception as error:  # template errors (e.g. roles not alternating) are the caller's
            raise RequestError(f"chat template rejected the messages: {error}") from error
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise RequestError("prompt is empty")
        vocab = len(tokenizer)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("a token-list prompt must hold only ints")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        ids = list(prompt)
    else:
        raise RequestError(f"prompt must be a string, a list of token ids or chat messages, not {type(prompt).__name__}")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    if not ids:
        raise RequestError("prompt is empty after tokenization")
    return list(ids)


def validate(request: Request, adapters: list[str]) -> None:
    """Raise RequestError for anything wrong with the request's settings (the prompt is checked by encode_prompt)."""
    n = request.max_new_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise RequestError(f"max_new_tokens must be an integer > 0, got {n!r}")
    sampling = request.sampling
    if not isinstance(sampling, SamplingParams):
        raise RequestError("sampling must be a SamplingParams")
    try:
        sampling.validate()
    except ValueError as error:
        raise RequestError(str(error)) from None
    if sampling.temperature == float("inf"):
        raise RequestError("temperature must be finite, got inf")
    for name in ("top_k", "seed"):
        if getattr(sampling, name) > INT64_MAX:
            raise RequestError(f"{name} must be at most 2**63 - 1, got {getattr(sampling, name)}")
    if request.stop is None:
        request.stop = ()
    elif isinstance(request.stop, str):
        request.stop = (request.stop,)
    elif isinstance(request.stop, (list, tuple)):
        request.stop = tuple(request.stop)
    else:
        raise RequestError(f"stop must be a string or a list of strings, not {type(request.stop).__name__}")
    if any(not isinstance(s, str) or not s for s in request.stop):
        raise RequestError(f"stop strings must be non-empty strings, got {list(request.stop)!r}")
    for text in request.stop:
        _check_text(text, "a stop string")
    if request.adapter is not None and request.adapter not in adapters:
        known = ", ".join(adapters) if adapters else "none are loaded"
        raise RequestError(f"unknown LoRA adapter {request.adapter!r} (loaded: {known})")
    if request.on_token is not None and not callable(request.on_token):
        raise RequestError("on_token must be callable")


class Detokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding the whole list.

    Decodes a short window that starts a few tokens back (as text-generation-inference does),
    so that multi-token characters and sentencepiece's leading spaces come out right; holds
    text back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])  # context so the first token's leading space is decoded right
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""


def now() -> float:
    return time.perf_counter()
