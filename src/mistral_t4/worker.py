"""One worker thread owns the engine; any thread submits requests and gets a future.

The GPU can only do one thing at a time, and batching is what makes it fast, so requests
from many client threads go into one queue. The worker thread loops:

    1. take new requests from the queue (block only when there is nothing to do)
    2. drop waiting requests that were cancelled or timed out
    3. prefill waiting requests into free slots (they join the running batch)
    4. run one engine step; resolve the futures of requests that finished

Every submitted request ends in exactly one way: a `Result` (finish_reason "length", "eos",
"stop", "cancelled" or "timeout") or an exception on its future (`RequestError` for bad
input, `EngineError` when the batch it ran in failed, `ShutdownError`, `TimeoutError`,
or `CancelledError` when cancelled before it started). A failing batch never stops the
worker: its requests get the error, the engine is reset, and the next requests are served.
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


class _Job:
    __slots__ = ("seq", "future", "deadline")

    def __init__(self, seq: Sequence, future: Future, deadline: float | None):
        self.seq, self.future, self.deadline = seq, future, deadline


class Worker:
    """Serve an engine (`engine.Engine` or `hf_engine.HFEngine`) from a background thread."""

    def __init__(self, engine, name: str = "mistral_t4-worker"):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._cancel_on_close = False
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
        future: Future = Future()
        submitted = now()
        try:
            if self._closing.is_set():
                raise ShutdownError("the worker is shut down; no new requests are taken")
            if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
                raise RequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
            seq = self.engine.prepare(request, submitted)
        except Exception as error:  # noqa: BLE001 - bad input is reported on the future
            future.set_exception(error if isinstance(error, (RequestError, ShutdownError))
                                 else RequestError(f"{type(error).__name__}: {error}"))
            return future
        job = _Job(seq, future, submitted + timeout if timeout is not None else None)
        with self._lock:
            self._by_future[future] = job
        self._inbox.put(job)
        return future

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield the text of one request as it is generated; raises its error, if any, at the end."""
        deltas: queue.Queue = queue.Queue()
        future = self.submit(prompt, on_token=lambda token, text: deltas.put(text), **kwargs)
        future.add_done_callback(lambda f: deltas.put(None))
        while (delta := deltas.get()) is not None:
            if delta:
                yield delta
        future.result()

    @contextlib.contextmanager
    def hold(self):
        """Queue requests without starting any until the block ends (a benchmark submits all at once)."""
        self._held.set()
        try:
            yield self
        finally:
            self._held.clear()

    def cancel(self, future: Future) -> bool:
        """Cancel a request: before it starts its future is cancelled; while running it ends as "cancelled"."""
        if future.cancel():
            return True
        with self._lock:
            job = self._by_future.get(future)
        if job is None or future.done():
            return False
        job.seq.finish_reason = job.seq.finish_reason or "cancelled"
        return True

    def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; finish (or, with cancel_pending, cancel) the rest; join the thread."""
        self._cancel_on_close = cancel_pending
        self._closing.set()
        self._inbox.put(None)  # wake the thread
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel_pending=exc[0] is not None)

    # ---------------------------------------------------------------- worker thread

    def _run(self) -> None:
        waiting: deque[_Job] = deque()
        running: dict[int, _Job] = {}  # id(seq) -> job
        while True:
            idle = not running and not waiting
            if idle and self._closing.is_set() and self._inbox.empty():
                break
            self._take(waiting, block=idle)
            if self._closing.is_set() and self._cancel_on_close:
                self._fail_all(waiting, running, ShutdownError("the worker was shut down before this finished"))
                continue
            self._expire(waiting, running)
            try:
                self._admit(waiting, running)
                if running:
                    for seq in self.engine.step():
                        self._finish(running.pop(id(seq)))
            except Exception as error:  # noqa: BLE001 - the batch fails, the worker goes on
                self._fault(error, running)

    def _take(self, waiting: deque, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if job is not None:
                    waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _expire(self, waiting: deque, running: dict) -> None:
        clock = now()
        for job in list(waiting):
            if job.future.cancelled():
                waiting.remove(job)
                self._forget(job)
            elif job.deadline is not None and clock > job.deadline:
                waiting.remove(job)
                self._settle(job, error=TimeoutError("the request timed out before it started"))
        for job in running.values():
            if job.deadline is not None and clock > job.deadline and not job.seq.done:
                job.seq.finish_reason = "timeout"

    def _admit(self, waiting: deque, running: dict) -> None:
        free = self.engine.free_slots()
        if not free or not waiting or self._held.is_set():
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
            running[id(job.seq)] = job
        finished, failed = self.engine.admit([job.seq for job in batch])
        for seq, error in failed:
            self._settle(running.pop(id(seq)), error=_engine_error(error))
        for seq in finished:
            self._finish(running.pop(id(seq)))

    def _finish(self, job: _Job) -> None:
        seq = job.seq
        if seq.error is not None:
            self._settle(job, error=RequestError(f"on_token callback raised {type(seq.error).__name__}: {seq.error}"))
        else:
            self._settle(job, result=seq.result())

    def _fault(self, error: Exception, running: dict) -> None:
        """A step or prefill raised: fail every running request with it and reset the engine."""
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.engine.reset()
        for job in list(running.values()):
            self._settle(job, error=_engine_error(error))
        running.clear()

    def _fail_all(self, waiting: deque, running: dict, error: Exception) -> None:
        while waiting:
            self._settle(waiting.popleft(), error=error)
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
        if job.future.done():
            return
        if job.future.running() or job.future.set_running_or_notify_cancel():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _forget(self, job: _Job) -> None:
        with self._lock:
            self._by_future.pop(job.future, None)


def _engine_error(error: Exception) -> EngineError:
    if isinstance(error, (EngineError, RequestError)):
        return error
    kind = "out of GPU memory" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
    return EngineError(f"the batch failed ({kind}): {error}")
