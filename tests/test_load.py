"""Load: 200 requests from 32 client threads, mixed and partly invalid, on one worker with 8 slots.

This is the CI-size run of `bench/load_test.py` (whose full size uses smollm2-mistral): the
same workload builder and checks, on the tiny-random checkpoint with fewer new tokens.
Every valid request must return the tokens it gets when run alone (greedy and seeded
sampling alike), every invalid one its error, every future must resolve exactly once, and
memory must not grow from one round to the next.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import tracemalloc

import pytest

from mistral_t4 import loading
from mistral_t4.engine import make_engine
from mistral_t4.worker import Worker
from tracking import assert_engine_clean, ledger, one_torch_thread  # noqa: F401 - autouse fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def load_test():
    """bench/load_test.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("load_test", REPO / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(tiny_random_path):
    model, tokenizer = loading.load(str(tiny_random_path), quant="fp32", device="cpu")
    return make_engine("mistral_t4", model, tokenizer, max_batch=8, max_len=256, compile=False)


def test_200_requests_from_32_threads_all_end_once_and_right(engine, load_test, ledger):
    cases = load_test.make_cases(200, engine.tokenizer, engine.max_len, max_new_tokens=8, invalid_every=10, seed=1)
    invalid = [c for c in cases if c.error is not None]
    sampled = [c for c in cases if c.sampled]
    assert len(invalid) == 20 and len(sampled) > 50 and len(cases) - len(invalid) - len(sampled) > 50
    assert {type(c.kwargs["prompt"]).__name__ for c in cases} == {"str", "list"}
    with Worker(engine) as worker:
        round_ = load_test.run_round(worker, cases, threads=32)
        reference = load_test.run_alone(worker, cases)
        problems = load_test.check_round(round_, cases, reference) + load_test.engine_state(worker)
        assert not problems, problems[:20]
        assert worker.alive
    assert round_.resolutions == [1] * 200
    counts = ledger.check()
    assert counts["RequestError"] == 20 and sum(v for k, v in counts.items() if k.startswith("result:")) == 2 * 180
    assert_engine_clean(engine)


def test_memory_does_not_grow_across_rounds(engine, load_test, ledger):
    cases = load_test.make_cases(80, engine.tokenizer, engine.max_len, max_new_tokens=6, invalid_every=8, seed=2)
    snapshots = []
    tracemalloc.start()
    try:
        with Worker(engine) as worker:
            reference = None
            for _ in range(4):
                round_ = load_test.run_round(worker, cases, threads=16)
                if reference is None:  # round 1 sets the reference; later rounds must repeat it exactly
                    reference = {c.index: o.tokens for c, o in zip(cases, round_.outcomes) if c.error is None}
                assert not load_test.check_round(round_, cases, reference) + load_test.engine_state(worker)
                ledger.check()
                ledger.futures.clear()  # the ledger's own hold on results must not count as growth
                snapshots.append(load_test.memory_snapshot(engine))
    finally:
        tracemalloc.stop()
    # RSS within 64 MiB (allocator noise), Python heap within 1 MiB of round 1
    assert not load_test.growth_problems(snapshots, 64.0, 1.0, 1.0), snapshots
    assert_engine_clean(engine)


def test_the_full_size_script_runs_and_ends_with_json(tiny_random_path, model_cache):
    import json
    import os
    import subprocess

    env = {**os.environ, "MISTRAL_T4_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "load_test.py"), "--model", "tiny-random",
                           "--device", "cpu", "--requests", "40", "--threads", "8", "--rounds", "2",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["worker_alive_at_end"] and len(report["rounds"]) == 2
    assert report["invalid"] == 4 and all(r["results"] == 36 and r["errors"] == 4 for r in report["rounds"])
    assert "load test PASSED" in proc.stdout
