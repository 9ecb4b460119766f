"""One worker thread owns the engine; any thread submits requests and gets a future.

The GPU can only do one thing at a time, and batching is what makes it fast, so requests
from many client threads go into one queue. The worker thread loops:

    1. take new requests from the queue (block only when there is nothing to do)
    2. drop waiting requests that were cancelled or timed out; mark running ones to stop
    3. prefill waiting requests into free slots (they join the running batch)
    4. run one engine step; resolve the futures of requests that finished

Every submitted request ends in exactly one way: a `Result` (finish_reason "length", "eos",
"stop", "cancelled" or "timeout") or an exception on its future (`RequestError` for bad
input, `EngineError` when the batch it ran in failed, `ShutdownError`, `TimeoutError`,
or `CancelledError` when cancelled before it started). A failing batch never stops the
worker: its requests get the error, the engine is reset, and the next requests are served.

Only the worker thread touches the engine and the running sequences; client threads
tokenize their own prompts (`engine.prepare`), put jobs in the queue and flag jobs to
stop. That keeps the engine free of locks.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import Iterator

import torch

from mistral_t4.requests import EngineError, Request, RequestError, ShutdownError, now
from mistral_t4.sampling import SamplingParams
from mistral_t4.sequence import Sequence

_IDLE_WAIT_S = 0.05  # how long the worker sleeps on the queue when it cannot make progress


class _Job:
    __slots__ = ("seq", "future", "deadline", "stop_reason")

    def __init__(self, seq: Sequence, future: Future, deadline: float | None):
        self.seq, self.future, self.deadline = seq, future, deadline
        self.stop_reason: str | None = None  # set by a client thread ("cancelled"); applied by the worker


class Worker:
    """Serve an engine (`engine.Engine` or `hf_engine.HFEngine`) from a background thread."""

    def __init__(self, engine, name: str = "mistral_t4-worker"):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._cancel_on_close = False
        # Guards _by_future, and makes "not closing? then enqueue" atomic against close(),
        # so no job can slip into the queue after the worker thread has drained it for the last time.
        self._lock = threading.Lock()
        self._by_future: dict[Future, _Job] = {}
        self._held = threading.Event()  # while set, requests queue up but none starts
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- client side

    def submit(self, prompt, *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop=(), ignore_eos: bool = False, adapter: str | None = None,
               on_token=None, timeout: float | None = None) -> Future:
        """Queue one request; returns a Future of `Result`. Never raises: errors land on the future."""
        request = Request(prompt=prompt, max_new_tokens=max_new_tokens,
                          sampling=SamplingParams(temperature, top_k, top_p, seed), stop=stop,
                          ignore_eos=ignore_eos, adapter=adapter, on_token=on_token)
        return self.submit_request(request, timeout=timeout)

    def submit_request(self, request: Request, timeout: float | None = None) -> Future:
        """Queue `request`; `timeout` (seconds from now) ends it with TimeoutError or finish_reason "timeout"."""
        future: Future = Future()
        submitted = now()
        try:
            if self._closing.is_set():
                raise ShutdownError("the worker is shut down; no new requests are taken")
            if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                            and timeout > 0):
                raise RequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
            seq = self.engine.prepare(request, submitted)
        except Exception as error:  # noqa: BLE001 - bad input is reported on the future
            future.set_exception(error if isinstance(error, (RequestError, ShutdownError))
                                 else RequestError(f"{type(error).__name__}: {error}"))
            return future
        job = _Job(seq, future, submitted + timeout if timeout is not None else None)
        with self._lock:
            if self._closing.is_set():  # close() won the race while we were tokenizing
                future.set_exception(ShutdownError("the worker is shut down; no new requests are taken"))
                return future
            self._by_future[future] = job
            self._inbox.put(job)
        return future

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield the text of one request as it is generated; raises its error, if any, at the end.

        Leaving the loop early (break, an exception) cancels the request.
        """
        deltas: queue.Queue = queue.Queue()
        future = self.submit(prompt, on_token=lambda token, text: deltas.put(text), **kwargs)
        future.add_done_callback(lambda f: deltas.put(None))
        try:
            while (delta := deltas.get()) is not None:
                if delta:
                    yield delta
        finally:
            if not future.done():
                self.cancel(future)
        future.result()

    @contextlib.contextmanager
    def hold(self):
        """Queue requests without starting any until the block ends (a benchmark submits all at once)."""
        self._held.set()
        try:
            yield self
        finally:
            self._held.clear()
            self._inbox.put(None)  # wake the thread now, not at its next idle timeout

    def cancel(self, future: Future) -> bool:
        """Cancel a request: before it starts its future is cancelled (CancelledError); while running it
        ends at the next step with finish_reason "cancelled". False if it had already ended."""
        if future.cancel():
            return True
        with self._lock:
            job = self._by_future.get(future)
            if job is None or future.done():
                return False
            job.stop_reason = job.stop_reason or "cancelled"
        return True

    def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; finish the rest (or, with cancel_pending, end them now); join the thread.

        With cancel_pending, waiting requests fail with ShutdownError and running ones end at the
        next step with finish_reason "cancelled" (their tokens so far are kept).
        """
        with self._lock:
            self._cancel_on_close = self._cancel_on_close or cancel_pending
            self._closing.set()
        self._inbox.put(None)  # wake the thread
        if threading.current_thread() is not self._thread:  # close() from an on_token callback must not self-join
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Requests submitted and not ended yet (waiting or running)."""
        with self._lock:
            return len(self._by_future)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel_pending=exc[0] is not None)

    # ---------------------------------------------------------------- worker thread

    def _run(self) -> None:
        waiting: deque[_Job] = deque()
        running: dict[int, _Job] = {}  # id(seq) -> job
        try:
            self._serve(waiting, running)
        except BaseException as error:  # a bug in this loop: end every request rather than strand it
            with self._lock:
                self._closing.set()
                stranded = list(self._by_future.values())
            failure = EngineError(f"the worker stopped unexpectedly ({type(error).__name__}: {error})")
            for job in stranded:
                self._settle(job, error=failure)
            raise

    def _serve(self, waiting: deque, running: dict) -> None:
        while True:
            closing = self._closing.is_set()
            if closing and not running and not waiting and self._inbox.empty():
                return  # submit() enqueues under the lock only while not closing: nothing more can come
            stuck = not running and (not waiting or self._held.is_set())
            self._take(waiting, block=stuck)
            if closing and self._cancel_on_close:
                self._cancel_all(waiting, running)
                continue
            self._expire(waiting, running)
            try:
                # read after _take: hold() may have begun while we slept on the queue. A drain on
                # close() must not wait for a hold() that nobody will release.
                if not self._held.is_set() or closing:
                    self._admit(waiting, running)
                if running:
                    for seq in self.engine.step():
                        self._finish(running.pop(id(seq)))
            except Exception as error:  # noqa: BLE001 - the batch fails, the worker goes on
                self._fault(error, running)

    def _take(self, waiting: deque, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                if job is not None:
                    waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _expire(self, waiting: deque, running: dict) -> None:
        """Drop cancelled / timed-out waiting jobs; tell running ones to stop at the next step."""
        clock = now()
        for job in list(waiting):
            if job.future.cancelled():
                waiting.remove(job)
                self._forget(job)
            elif job.deadline is not None and clock > job.deadline:
                waiting.remove(job)
                self._settle(job, error=TimeoutError("the request timed out before it started"))
        for job in running.values():
            if job.seq.done:
                continue
            if job.stop_reason is not None:
                job.seq.finish_reason = job.stop_reason
            elif job.deadline is not None and clock > job.deadline:
                job.seq.finish_reason = "timeout"

    def _admit(self, waiting: deque, running: dict) -> None:
        free = self.engine.free_slots()
        if not free or not waiting:
            return
        batch: list[_Job] = []
        for job in list(waiting):
            if len(batch) == free:
                break
            if batch and not self.engine.compatible(batch[0].seq, job.seq):
                continue
            waiting.remove(job)
            if job.future.set_running_or_notify_cancel():
                batch.append(job)
            else:
                self._forget(job)
        if not batch:
            return
        for job in batch:
            if job.stop_reason is not None:  # cancelled between the queue and here: stops after its first token
                job.seq.finish_reason = job.stop_reason
            running[id(job.seq)] = job
        finished, failed = self.engine.admit([job.seq for job in batch])
        for seq, error in failed:
            self._settle(running.pop(id(seq)), error=_engine_error(error))
        for seq in finished:
            self._finish(running.pop(id(seq)))

    def _finish(self, job: _Job) -> None:
        seq = job.seq
        if seq.error is not None:  # this request failed on its own (see Sequence.error)
            self._settle(job, error=seq.error)
            return
        try:
            result = seq.result()
        except Exception as error:  # noqa: BLE001 - e.g. the tokenizer fails to decode: only this request fails
            self._settle(job, error=EngineError(f"could not build the result ({type(error).__name__}: {error})"))
            return
        self._settle(job, result=result)

    def _fault(self, error: Exception, running: dict) -> None:
        """A step or prefill raised: fail every running request with it and reset the engine."""
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        failure = _engine_error(error)
        try:
            self.engine.reset()
        except Exception as reset_error:  # noqa: BLE001 - still settle every request below
            failure = EngineError(f"{failure}; resetting the engine failed too ({type(reset_error).__name__}: "
                                  f"{reset_error})")
        for job in list(running.values()):
            self._settle(job, error=failure)
        running.clear()

    def _cancel_all(self, waiting: deque, running: dict) -> None:
        """close(cancel_pending=True): waiting jobs fail, running ones end "cancelled" after one more step."""
        while waiting:
            self._settle(waiting.popleft(), error=ShutdownError("the worker was shut down before this started"))
        for job in running.values():
            job.seq.finish_reason = job.seq.finish_reason or "cancelled"
        if running:
            try:
                for seq in self.engine.step():  # releases the cancelled sequences' slots
                    self._finish(running.pop(id(seq)))
            except Exception as step_error:  # noqa: BLE001
                self._fault(step_error, running)

    def _settle(self, job: _Job, result=None, error: Exception | None = None) -> None:
        self._forget(job)
        future = job.future
        if future.done():
            return
        if future.running() or future.set_running_or_notify_cancel():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _forget(self, job: _Job) -> None:
        with self._lock:
            self._by_future.pop(job.future, None)


def _engine_error(error: Exception) -> Exception:
    if isinstance(error, (EngineError, RequestError)):
        return error
    kind = "out of GPU memory" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
    return EngineError(f"the batch failed ({kind}): {error}")
