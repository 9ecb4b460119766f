"""Shared by the reliability tests: count how every request's future ends, and a tiny engine to serve them.

The worker promises that every submitted request ends exactly once: one result, one
exception, or (cancelled before it started) a cancelled future. `ledger` swaps the
worker's `Future` for one that counts every attempt to settle it, so a test sees a future
settled twice (the second attempt raises inside the worker and is counted) or never.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, Future

import pytest
import torch

from mistral_t4 import worker as worker_module


class CountingFuture(Future):
    """A Future that records how many times the worker tried to settle it."""

    def __init__(self, ledger: "Ledger"):
        super().__init__()
        self.settle_attempts = 0
        with ledger.lock:
            ledger.futures.append(self)

    def set_result(self, result):
        self.settle_attempts += 1
        super().set_result(result)

    def set_exception(self, exception):
        self.settle_attempts += 1
        super().set_exception(exception)


def outcome(future: Future) -> str:
    """'result:<finish_reason>', 'cancelled', or the exception's type name."""
    if future.cancelled():
        return "cancelled"
    error = future.exception(timeout=0)
    if error is not None:
        return type(error).__name__
    return f"result:{future.result().finish_reason}"


class Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        self.futures: list[CountingFuture] = []

    def check(self, timeout: float = 120.0) -> Counter:
        """Wait (bounded) for every future; assert each ended exactly once; return the outcome counts."""
        deadline = time.monotonic() + timeout
        with self.lock:
            futures = list(self.futures)
        for future in futures:
            try:
                future.result(timeout=max(deadline - time.monotonic(), 0.01))
            except (CancelledError, Exception):  # noqa: BLE001 - any ending is fine here; counted below
                pass
        unresolved = [f for f in futures if not f.done()]
        assert not unresolved, f"{len(unresolved)} of {len(futures)} requests never ended"
        for future in futures:
            expected = 0 if future.cancelled() else 1
            assert future.settle_attempts == expected, (
                f"a future was settled {future.settle_attempts} times ({outcome(future)})")
        return Counter(outcome(f) for f in futures)


@pytest.fixture(autouse=True)
def ledger(monkeypatch):
    """Every future the worker creates in this test is counted; at the end each must have ended once."""
    book = Ledger()
    monkeypatch.setattr(worker_module, "Future", lambda: CountingFuture(book))
    yield book
    book.check()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are all per-op overhead: one intra-op thread is faster, and on a busy 2-core machine
    OpenMP threads spinning against other processes made each decode step 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_engine(seed: int = 0, max_batch: int = 4, max_len: int = 128, **engine_kwargs):
    """(engine, hf model) over a float32 tiny Mistral on the CPU, with the real Mistral tokenizer."""
    from helpers import tiny_model
    from mistral_t4.engine import Engine
    from mistral_t4.model import FastMistral
    from mistral_t4.models import mistral_tokenizer

    hf = tiny_model(seed=seed)
    engine = Engine(FastMistral.from_hf(hf), mistral_tokenizer(), max_batch=max_batch, max_len=max_len,
                    compile=False, **engine_kwargs)
    return engine, hf


def assert_engine_clean(engine) -> None:
    """No sequence left running and every cache slot free."""
    assert not engine.active, engine.active
    assert engine.free_slots() == engine.max_batch
    assert not engine.cache.slots.used
    assert int(engine.running.sum()) == 0
