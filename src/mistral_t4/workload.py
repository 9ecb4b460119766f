"""The workload behind every performance claim, and what is measured of it.

W32 (the reference's): 32 requests submitted at once from 32 client threads to one worker,
128 prompt tokens each, exactly 128 new tokens each (EOS ignored), greedy. Every engine
runs the same prompts the same way: all requests are queued before any starts, the clock
starts at submission, and time to first token and per-token latency come from the host
clock as each token becomes known.
"""

from __future__ import annotations

import statistics
import threading
import time

from mistral_t4 import devices
from mistral_t4.requests import now


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """`n` distinct prompts of exactly `length` token ids, cut from real text at different offsets."""
    text = (
        "The history of computing is a story of memory and arithmetic racing each other. "
        "Engineers built machines that could add faster than they could remember, then memories "
        "that outran the adders, and every generation of hardware rebalanced the two. "
    ) * 64
    ids = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = length - len(bos)
    if body < 1:
        raise ValueError(f"prompt length {length} is too short")
    prompts = []
    for i in range(n):
        start = (seed * 7919 + i * 37) % max(len(ids) - body, 1)
        chunk = (ids[start:] + ids)[:body]
        prompts.append(bos + chunk)
    return prompts


def run_workload(worker, prompts: list[list[int]], new_tokens: int, progress: bool = True,
                 label: str = "") -> dict:
    """Submit every prompt at once from its own client thread; wait for all; return the measurements."""
    n = len(prompts)
    futures = [None] * n
    barrier = threading.Barrier(n + 1)
    # Progress counts finished requests: a per-token callback would make every engine
    # detokenize every token on the serving thread, which is not what is being measured.
    bar = _progress(n, label) if progress else None

    def client(i):
        barrier.wait()
        futures[i] = worker.submit(prompts[i], max_new_tokens=new_tokens, ignore_eos=True)
        if bar is not None:
            futures[i].add_done_callback(lambda _: bar.update(1))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    device = worker.engine.device
    devices.reset_peak_memory(device)
    with worker.hold():  # every request is queued before any starts: same start for every engine
        for t in threads:
            t.start()
        barrier.wait()
        start = now()
        for t in threads:
            t.join()
    results, errors = [], []
    for future in futures:
        try:
            results.append(future.result())
        except Exception as error:  # noqa: BLE001 - counted and reported, never hidden
            errors.append(f"{type(error).__name__}: {error}")
    end = max((r.finished_at for r in results), default=now())
    if bar is not None:
        bar.close()
    return summarize(results, errors, start, end, device)


def summarize(results, errors, start: float, end: float, device) -> dict:
    wall = end - start
    out_tokens = sum(len(r.tokens) for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    latencies = [r.finished_at - start for r in results]
    ttfts = [r.first_token_at - start for r in results]
    gaps = [g for r in results for g in r.inter_token_latencies]
    peak = devices.peak_memory_bytes(device)
    return {
        "requests_total": len(results) + len(errors),
        "requests_ok": len(results),
        "errors": errors[:10],
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": out_tokens + prompt_tokens,
        "wall_s": round(wall, 4),
        "output_tokens_per_s": round(out_tokens / wall, 2) if wall > 0 else None,
        "total_tokens_per_s": round((out_tokens + prompt_tokens) / wall, 2) if wall > 0 else None,
        "latency_avg_s": _round(statistics.fmean(latencies)) if latencies else None,
        "latency_p50_s": _round(_percentile(latencies, 50)),
        "latency_p99_s": _round(_percentile(latencies, 99)),
        "ttft_avg_s": _round(statistics.fmean(ttfts)) if ttfts else None,
        "ttft_p50_s": _round(_percentile(ttfts, 50)),
        "ttft_p99_s": _round(_percentile(ttfts, 99)),
        "token_latency_p50_ms": _round(_percentile(gaps, 50), 1000),
        "token_latency_p99_ms": _round(_percentile(gaps, 99), 1000),
        "peak_memory_gib": round(peak / devices.GIB, 3) if peak is not None else None,
    }


def _percentile(values, pct):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def _round(value, scale=1.0):
    return None if value is None else round(value * scale, 4)


def _progress(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label or "requests", unit="req", leave=False, mininterval=0.5)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
