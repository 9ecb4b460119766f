"""How requests end in the worker: cancelled, timed out, shut down, drained; never lost, never twice.

Timing is controlled with `Worker.hold()` (queue without starting) and with on_token
callbacks that block or sleep (they run on the worker thread, between steps), so the tests
do not depend on how fast the machine is. Every wait has a bound.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

from helpers import hf_greedy, ragged_prompts
from mistral_t4.requests import ShutdownError
from mistral_t4.worker import Worker
from tracking import assert_engine_clean, ledger, one_torch_thread, outcome, tiny_engine  # noqa: F401 - autouse

WAIT = 120


@pytest.fixture(scope="module")
def served():
    engine, hf = tiny_engine(seed=31, max_batch=4, max_len=128)
    return engine, hf


@pytest.fixture
def engine(served):
    engine = served[0]
    yield engine
    assert_engine_clean(engine)


def prompts(n, seed=32):
    return ragged_prompts(n, 32000, seed=seed, low=3, high=12)


class Gate:
    """An on_token callback that stops the worker thread at token `at` until the test opens the gate."""

    def __init__(self, at: int):
        self.at, self.count = at, 0
        self.reached, self.opened = threading.Event(), threading.Event()

    def __call__(self, token, text):
        self.count += 1
        if self.count == self.at:
            self.reached.set()
            assert self.opened.wait(WAIT)


def slow(seconds: float):
    return lambda token, text: time.sleep(seconds)


# ---------------------------------------------------------------- cancellation

def test_cancel_before_start_gives_cancelled_error(engine):
    with Worker(engine) as worker:
        with worker.hold():
            kept, dropped = [worker.submit(p, max_new_tokens=4, ignore_eos=True) for p in prompts(2)]
            assert worker.cancel(dropped)
        with pytest.raises(CancelledError):
            dropped.result(timeout=WAIT)
        assert len(kept.result(timeout=WAIT).tokens) == 4
        assert not worker.cancel(kept)  # already ended
    assert worker.pending == 0


def test_cancel_while_running_ends_with_the_tokens_so_far(engine, served):
    hf = served[1]
    prompt, other = prompts(2, seed=33)
    gate = Gate(at=3)
    with Worker(engine) as worker:
        future = worker.submit(prompt, max_new_tokens=100, ignore_eos=True, on_token=gate)
        neighbour = worker.submit(other, max_new_tokens=20, ignore_eos=True)
        assert gate.reached.wait(WAIT)
        assert worker.cancel(future)
        gate.opened.set()
        result = future.result(timeout=WAIT)
        assert result.finish_reason == "cancelled"
        assert result.tokens == hf_greedy(served[1], prompt, 3)  # exactly the tokens it had when cancelled
        assert neighbour.result(timeout=WAIT).tokens == hf_greedy(hf, other, 20)  # the batch goes on
        assert not worker.cancel(future)


def test_cancelling_a_future_the_worker_does_not_know_returns_false(engine):
    from concurrent.futures import Future

    with Worker(engine) as worker:
        assert not worker.cancel(worker.submit("", max_new_tokens=2))  # failed at once: already ended
        stranger = Future()
        stranger.set_result(None)
        assert not worker.cancel(stranger)


def test_leaving_a_stream_early_cancels_its_request(engine, ledger):
    with Worker(engine) as worker:
        pieces = []
        for piece in worker.stream([1, 415, 2936], max_new_tokens=100, ignore_eos=True):
            pieces.append(piece)
            if len(pieces) == 2:
                break
        futures = list(ledger.futures)
        assert len(futures) == 1
        assert futures[0].result(timeout=WAIT).finish_reason == "cancelled"
        assert len(futures[0].result().tokens) < 100


def test_stream_yields_the_text_and_raises_the_error(engine):
    with Worker(engine) as worker:
        text = "".join(worker.stream([1, 415, 2936], max_new_tokens=8, ignore_eos=True))
        future = worker.submit([1, 415, 2936], max_new_tokens=8, ignore_eos=True)
        assert text.strip() == future.result(timeout=WAIT).text.strip()
        with pytest.raises(ValueError, match="prompt is empty"):
            list(worker.stream(""))


# ---------------------------------------------------------------- timeouts

def test_timeout_while_waiting_gives_timeout_error(engine):
    with Worker(engine) as worker:
        with worker.hold():
            future = worker.submit(prompts(1)[0], max_new_tokens=4, timeout=0.2)
            time.sleep(0.5)
        with pytest.raises(TimeoutError, match="^the request timed out before it started$"):
            future.result(timeout=WAIT)


def test_timeout_while_running_ends_with_finish_reason_timeout(engine):
    with Worker(engine) as worker:
        future = worker.submit(prompts(1)[0], max_new_tokens=100, ignore_eos=True, timeout=0.5, on_token=slow(0.02))
        quick = worker.submit(prompts(1, seed=34)[0], max_new_tokens=5, ignore_eos=True, timeout=WAIT)
        result = future.result(timeout=WAIT)
        assert result.finish_reason == "timeout"
        assert 0 < len(result.tokens) < 100
        assert quick.result(timeout=WAIT).finish_reason == "length"


# ---------------------------------------------------------------- shutdown

def test_close_drains_every_request_in_flight(engine):
    worker = Worker(engine)
    futures = [worker.submit(p, max_new_tokens=6, ignore_eos=True) for p in prompts(10)]
    worker.close(timeout=WAIT)
    assert not worker.alive
    assert [outcome(f) for f in futures] == ["result:length"] * 10
    assert all(len(f.result().tokens) == 6 for f in futures)
    assert isinstance(worker.submit("Hello").exception(timeout=WAIT), ShutdownError)


def test_close_with_cancel_pending_ends_each_with_a_defined_status(engine):
    gate = Gate(at=2)
    worker = Worker(engine)
    with worker.hold():  # all four start together
        running = [worker.submit(p, max_new_tokens=100, ignore_eos=True, on_token=gate if i == 0 else None)
                   for i, p in enumerate(prompts(4))]
    assert gate.reached.wait(WAIT)  # 4 slots busy, the worker thread stopped inside a step
    waiting = [worker.submit(p, max_new_tokens=4) for p in prompts(6, seed=35)]
    closer = threading.Thread(target=worker.close, kwargs=dict(cancel_pending=True, timeout=WAIT))
    closer.start()
    time.sleep(0.1)
    gate.opened.set()
    closer.join(WAIT)
    assert not closer.is_alive() and not worker.alive
    assert [outcome(f) for f in running] == ["result:cancelled"] * 4
    assert all(0 < len(f.result().tokens) < 100 for f in running)
    assert [outcome(f) for f in waiting] == ["ShutdownError"] * 6
    assert str(waiting[0].exception()) == "the worker was shut down before this started"


def test_context_manager_exit_drains_or_cancels_never_hangs(engine):
    with Worker(engine) as worker:
        drained = [worker.submit(p, max_new_tokens=5, ignore_eos=True) for p in prompts(6)]
    assert [outcome(f) for f in drained] == ["result:length"] * 6
    with pytest.raises(ZeroDivisionError):
        with Worker(engine) as worker:
            gate = Gate(at=2)
            with worker.hold():  # four start together, two wait for a slot
                ended = [worker.submit(p, max_new_tokens=100, ignore_eos=True, on_token=gate if i == 0 else None)
                         for i, p in enumerate(prompts(6))]
            assert gate.reached.wait(WAIT)
            gate.opened.set()
            1 / 0
    assert not worker.alive
    assert {outcome(f) for f in ended} <= {"result:cancelled", "ShutdownError"}
    assert [outcome(f) for f in ended[4:]] == ["ShutdownError"] * 2  # never started: no slot was free


def test_close_while_held_still_drains(engine):
    worker = Worker(engine)
    with worker.hold():
        futures = [worker.submit(p, max_new_tokens=3, ignore_eos=True) for p in prompts(3)]
        worker.close(timeout=WAIT)
    assert not worker.alive
    assert [outcome(f) for f in futures] == ["result:length"] * 3


def test_close_from_an_on_token_callback_does_not_deadlock(engine):
    worker = Worker(engine)
    future = worker.submit([1, 415, 2936], max_new_tokens=4, ignore_eos=True,
                           on_token=lambda token, text: worker.close())
    assert future.result(timeout=WAIT).finish_reason == "length"
    worker.close(timeout=WAIT)
    assert not worker.alive


def test_submits_racing_close_all_end(engine):
    """Many threads submit while another closes: each request is served or refused, none stranded."""
    for round_ in range(3):
        worker = Worker(engine)
        futures, lock, start = [], threading.Lock(), threading.Barrier(9)

        def client(i):
            start.wait()
            for j in range(15):
                future = worker.submit([1, 3 + i, 4 + j], max_new_tokens=2, ignore_eos=True)
                with lock:
                    futures.append(future)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        start.wait()
        time.sleep(0.002 * round_)
        worker.close(timeout=WAIT)
        for t in threads:
            t.join(WAIT)
        assert not worker.alive
        outcomes = {outcome(f) for f in futures}
        assert outcomes <= {"result:length", "ShutdownError"}, outcomes
        assert worker.pending == 0


# ---------------------------------------------------------------- the loop itself

def test_a_held_worker_sleeps_instead_of_spinning(engine, monkeypatch):
    worker = Worker(engine)
    loops = {"n": 0}
    real = worker._expire

    def counting(*args):
        loops["n"] += 1
        return real(*args)

    monkeypatch.setattr(worker, "_expire", counting)
    with worker.hold():
        future = worker.submit([1, 5, 6], max_new_tokens=2, ignore_eos=True)
        time.sleep(1.0)
    assert loops["n"] < 60, f"{loops['n']} loop turns in 1 s while held: busy-waiting"
    assert future.result(timeout=WAIT).finish_reason == "length"
    worker.close(timeout=WAIT)


def test_results_carry_timings_and_ids(engine):
    with Worker(engine) as worker:
        future = worker.submit([1, 5, 6, 7], max_new_tokens=5, ignore_eos=True)
        result = future.result(timeout=WAIT)
    assert result.prompt_tokens == 4 and len(result.tokens) == 5 and len(result.token_times) == 5
    assert result.submitted_at <= result.first_token_at <= result.finished_at
    assert result.time_to_first_token >= 0 and len(result.inter_token_latencies) == 4
