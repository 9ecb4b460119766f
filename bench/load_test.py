"""Load test: many client threads, one worker, a mixed workload; nothing lost, nothing wrong, no leak.

    python bench/load_test.py                               # 200 requests, 32 threads, batch 8, smollm2-mistral
    python bench/load_test.py --rounds 3 --json out/load.json
    python bench/load_test.py --model tiny-random --requests 60 --threads 8   # a quick smoke run

Each round submits the same requests at once from `--threads` client threads: prompts of
mixed lengths (text, token lists, chat messages), greedy and seeded sampling, some
streamed, and every `--invalid-every`-th request invalid on purpose. Then it checks that

- every future resolved exactly once (counted with a done-callback per future);
- every valid request returned a `Result`, every invalid one its `RequestError`;
- greedy and seeded-sampling results equal the same request run alone (round 1 runs each
  valid request alone through the same worker; later rounds must repeat round 1 exactly);
- streamed tokens arrived one callback per token;
- afterwards the worker thread is alive, no request is pending, `engine.active` is empty,
  every cache slot is free, and memory (RSS; Python heap with --tracemalloc; GPU memory
  when on CUDA) does not grow from one round to the next beyond a bound.

Prints a summary; the last stdout line is one JSON document (also written to --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass, field

from mistral_t4.requests import RequestError

# Invalid requests the workload mixes in: (submit() arguments, error type, what the message must say).
INVALID = [
    (dict(prompt=""), RequestError, r"^prompt is empty$"),
    (dict(max_new_tokens=0), RequestError, r"^max_new_tokens must be an integer > 0, got 0$"),
    (dict(temperature=-1.0), RequestError, r"^temperature must be a number >= 0"),
    (dict(temperature=1.0, top_p=0.0), RequestError, r"^top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-2), RequestError, r"^top_k must be an integer >= 0"),
    (dict(adapter="missing"), RequestError, r"^unknown LoRA adapter 'missing'"),
    (dict(stop=["ok", ""]), RequestError, r"^stop strings must be non-empty strings"),
    (dict(prompt="bad \udce9 byte"), RequestError, r"^prompt is not valid Unicode text"),
    (dict(prompt=[1, 10**9]), RequestError, r"^token ids out of range"),
    (dict(max_new_tokens=10**6), RequestError, r"exceeds the cache length"),
]
WORDS = ("the cat sat on a warm mat while rain fell over old stone roofs and a kettle began to sing "
         "quietly in the kitchen as someone counted 1 2 3 4 5 and wrote notes about memory and speed").split()


@dataclass
class Case:
    """One request of the workload and what must come of it."""

    index: int
    kwargs: dict  # submit() arguments
    error: tuple | None = None  # (type, message regex) when invalid on purpose
    streamed: bool = False

    @property
    def sampled(self) -> bool:
        return self.kwargs.get("temperature", 0.0) > 0 if self.error is None else False


def make_cases(n: int, tokenizer, max_len: int, max_new_tokens: int, invalid_every: int, seed: int) -> list[Case]:
    """`n` requests, deterministic in `seed`: mixed prompt kinds and lengths, greedy and seeded sampling."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    cases = []
    for i in range(n):
        if invalid_every and i % invalid_every == invalid_every - 1:
            kwargs, kind, pattern = INVALID[(i // invalid_every) % len(INVALID)]
            cases.append(Case(i, {"prompt": "Hello there", **kwargs}, error=(kind, pattern)))
            continue
        new = rng.randint(1, max_new_tokens)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        kind = rng.choice(["text", "tokens", "chat"])
        if kind == "text":
            prompt = words
        elif kind == "tokens":
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 80))]
        else:
            prompt = [{"role": "user", "content": words}]
        kwargs = dict(prompt=prompt, max_new_tokens=new, ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:  # seeded sampling; greedy otherwise
            kwargs.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9]),
                          top_k=rng.choice([0, 40]), seed=rng.randrange(2**31))
        cases.append(Case(i, kwargs, streamed=rng.random() < 0.25))
    too_long = [c for c in cases if c.error is None and _prompt_len(tokenizer, c.kwargs["prompt"]) + c.kwargs[
        "max_new_tokens"] > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} workload requests do not fit max_len {max_len}; raise it")
    return cases


def _prompt_len(tokenizer, prompt) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    if prompt and isinstance(prompt[0], dict):
        return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    return len(prompt)


@dataclass
class Round:
    """What one round produced: per case, how many times its future resolved and how it ended."""

    resolutions: list[int]
    outcomes: list  # Result or exception, per case
    streamed_tokens: list[int]
    wall_s: float
    problems: list[str] = field(default_factory=list)


def run_round(worker, cases: list[Case], threads: int, timeout: float = 600.0) -> Round:
    """Submit every case at once from `threads` client threads; wait (bounded) for every future."""
    n = len(cases)
    resolutions, streamed = [0] * n, [0] * n
    futures = [None] * n
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def count_resolution(i):
        def done(_future):
            with lock:
                resolutions[i] += 1
        return done

    def count_token(i):
        def on_token(token, text):
            streamed[i] += 1  # only the worker thread calls this
        return on_token

    def client(t):
        start.wait()
        for case in cases[t::threads]:
            kwargs = dict(case.kwargs)
            if case.streamed:
                kwargs["on_token"] = count_token(case.index)
            future = worker.submit(kwargs.pop("prompt"), **kwargs)
            future.add_done_callback(count_resolution(case.index))
            futures[case.index] = future

    clients = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(threads)]
    began = time.perf_counter()
    for thread in clients:
        thread.start()
    start.wait()
    for thread in clients:
        thread.join(timeout)
    outcomes = []
    deadline = time.monotonic() + timeout
    for future in futures:
        try:
            outcomes.append(future.result(timeout=max(deadline - time.monotonic(), 0.01)))
        except Exception as error:  # noqa: BLE001 - every ending is recorded and checked
            outcomes.append(error)
    wall = time.perf_counter() - began
    time.sleep(0.05)  # done-callbacks run right after result() wakes us; let the last ones land
    return Round(resolutions, outcomes, streamed, wall)


def run_alone(worker, cases: list[Case], timeout: float = 600.0) -> dict[int, list[int]]:
    """Tokens of every valid case run by itself (nothing else in the batch)."""
    alone = {}
    for case in cases:
        if case.error is None:
            kwargs = dict(case.kwargs)
            alone[case.index] = worker.submit(kwargs.pop("prompt"), **kwargs).result(timeout=timeout).tokens
    return alone


def check_round(round_: Round, cases: list[Case], reference: dict[int, list[int]]) -> list[str]:
    """Every way this round fell short of the contract, as readable lines (empty: all good)."""
    from mistral_t4.requests import Result

    problems = []
    for case, count, got, streamed in zip(cases, round_.resolutions, round_.outcomes, round_.streamed_tokens):
        label = f"request {case.index} ({'invalid' if case.error else 'sampled' if case.sampled else 'greedy'})"
        if count != 1:
            problems.append(f"{label}: future resolved {count} times")
        if case.error is not None:
            kind, pattern = case.error
            if not isinstance(got, kind) or not re.search(pattern, str(got)):
                problems.append(f"{label}: expected {kind.__name__} /{pattern}/, got {got!r}")
        elif not isinstance(got, Result):
            problems.append(f"{label}: failed: {type(got).__name__}: {got}")
        else:
            if got.tokens != reference[case.index]:
                problems.append(f"{label}: tokens differ from the same request run alone")
            if case.streamed and streamed != len(got.tokens):
                problems.append(f"{label}: {streamed} tokens streamed for {len(got.tokens)} generated")
    return problems


def rss_bytes() -> int | None:
    """Resident memory of this process now (not the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss


def memory_snapshot(engine) -> dict:
    import torch

    gc.collect()
    snapshot = {"rss_mib": None, "python_heap_mib": None, "gpu_allocated_mib": None}
    rss = rss_bytes()
    if rss is not None:
        snapshot["rss_mib"] = round(rss / 2**20, 1)
    if tracemalloc.is_tracing():
        snapshot["python_heap_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 3)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        snapshot["gpu_allocated_mib"] = round(torch.cuda.memory_allocated(engine.device) / 2**20, 1)
    return snapshot


def engine_state(worker) -> list[str]:
    """What must hold between rounds: worker alive, nothing pending, no running sequence, every slot free."""
    engine = worker.engine
    problems = []
    if not worker.alive:
        problems.append("the worker thread died")
    if worker.pending:
        problems.append(f"{worker.pending} requests still pending")
    if engine.active:
        problems.append(f"{len(engine.active)} sequences still active")
    if engine.free_slots() != engine.max_batch:
        problems.append(f"{engine.max_batch - engine.free_slots()} cache slots not freed")
    return problems


def growth_problems(snapshots: list[dict], rss_mib: float, heap_mib: float, gpu_mib: float) -> list[str]:
    """Memory after each round from the 2nd on, against the 1st (which warms caches up)."""
    problems = []
    first = snapshots[0]
    for number, snap in enumerate(snapshots[1:], start=2):
        for key, bound in (("rss_mib", rss_mib), ("python_heap_mib", heap_mib), ("gpu_allocated_mib", gpu_mib)):
            if snap[key] is not None and first[key] is not None and snap[key] - first[key] > bound:
                problems.append(f"round {number}: {key} grew {snap[key] - first[key]:.2f} MiB (bound {bound})")
    return problems


def load_test(worker, cases: list[Case], threads: int, rounds: int, log=print, bounds=(64.0, 2.0, 1.0),
              timeout: float = 1800.0) -> dict:
    """Run `rounds` rounds of `cases` on `worker`; return the report (its "ok" says whether all checks held).

    `timeout` bounds the wait for one round (and for the reference runs): a request still
    unanswered then counts as a problem instead of hanging the test.
    """
    reference = None
    report = {"rounds": [], "problems": []}
    snapshots = []
    for number in range(1, rounds + 1):
        round_ = run_round(worker, cases, threads, timeout)
        if reference is None:
            alone_start = time.perf_counter()
            reference = run_alone(worker, cases, timeout)
            log(f"[load] ran {len(reference)} valid requests alone for reference in "
                f"{time.perf_counter() - alone_start:.1f} s")
        problems = check_round(round_, cases, reference) + engine_state(worker)
        snapshots.append(memory_snapshot(worker.engine))
        tokens = sum(len(o.tokens) for o in round_.outcomes if hasattr(o, "tokens"))
        summary = {
            "round": number, "wall_s": round(round_.wall_s, 2), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / round_.wall_s, 1) if round_.wall_s else None,
            "results": sum(hasattr(o, "tokens") for o in round_.outcomes),
            "errors": sum(isinstance(o, Exception) for o in round_.outcomes),
            "problems": len(problems), **snapshots[-1],
        }
        report["rounds"].append(summary)
        report["problems"] += [f"round {number}: {p}" for p in problems]
        log(f"[load] round {number}: {summary['results']} results, {summary['errors']} errors (as planned: "
            f"{sum(c.error is not None for c in cases)}), {len(problems)} problems, {summary['wall_s']} s, "
            f"{summary['output_tokens_per_s']} out tok/s, rss {summary['rss_mib']} MiB")
        for problem in problems[:10]:
            log(f"[load]   {problem}")
    report["problems"] += growth_problems(snapshots, *bounds)
    report["ok"] = not report["problems"]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-mistral", help="model spec (see models.resolve)")
    parser.add_argument("--quant", help="nf4 | fp16 | fp32 (default: fp32 on CPU, nf4 on GPU)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="engine slots (max_batch)")
    parser.add_argument("--max-len", type=int, default=256, help="cache length per slot")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="each request asks for 1..N new tokens")
    parser.add_argument("--invalid-every", type=int, default=10, help="every N-th request is invalid (0: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracemalloc", action="store_true", help="also bound Python heap growth (slower)")
    parser.add_argument("--rss-growth-mib", type=float, default=64.0, help="allowed RSS growth after round 1")
    parser.add_argument("--heap-growth-mib", type=float, default=2.0, help="allowed traced heap growth after round 1")
    parser.add_argument("--gpu-growth-mib", type=float, default=1.0, help="allowed GPU memory growth after round 1")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for one round at most")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)

    from mistral_t4 import devices, loading
    from mistral_t4.engine import make_engine
    from mistral_t4.worker import Worker

    device = devices.pick_device(args.device)
    quant = args.quant or ("nf4" if device.type == "cuda" else "fp32")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - stdout ends with the JSON
    if args.tracemalloc:
        tracemalloc.start()
    began = time.perf_counter()
    model, tokenizer = loading.load(args.model, quant=quant, device=device)
    engine = make_engine("mistral_t4", model, tokenizer, max_batch=args.batch, max_len=args.max_len)
    engine.warmup()
    log(f"[load] {args.model} ({quant}) on {device}, batch {args.batch}, cache {engine.max_len}, "
        f"ready in {time.perf_counter() - began:.1f} s")
    cases = make_cases(args.requests, tokenizer, engine.max_len, args.max_new_tokens, args.invalid_every, args.seed)
    with Worker(engine) as worker:
        report = load_test(worker, cases, args.threads, args.rounds, log,
                           bounds=(args.rss_growth_mib, args.heap_growth_mib, args.gpu_growth_mib),
                           timeout=args.timeout)
        alive = worker.alive
    report.update(
        model=args.model, quant=quant, device=str(device), requests=args.requests,
        threads=args.threads, batch=args.batch, cache_len=engine.max_len, max_new_tokens=args.max_new_tokens,
        invalid=sum(c.error is not None for c in cases), sampled=sum(c.sampled for c in cases),
        streamed=sum(c.streamed for c in cases), worker_alive_at_end=alive, system=devices.describe(device),
    )
    for problem in report["problems"][:20]:
        print(f"PROBLEM {problem}")
    print(f"load test {'PASSED' if report['ok'] else 'FAILED'}: {args.rounds} rounds x {args.requests} requests from "
          f"{args.threads} threads ({report['invalid']} invalid, {report['sampled']} sampled, {report['streamed']} "
          f"streamed), {len(report['problems'])} problems")
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
