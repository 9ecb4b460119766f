"""The two command-line modes, run as a user would: `python -m mistral_t4 bench` and `... chat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
REPORT_FIELDS = {
    "requests_total", "requests_ok", "output_tokens", "prompt_tokens", "total_tokens", "wall_s",
    "output_tokens_per_s", "total_tokens_per_s", "latency_avg_s", "latency_p50_s", "latency_p99_s",
    "ttft_avg_s", "ttft_p50_s", "ttft_p99_s", "token_latency_p50_ms", "token_latency_p99_ms", "peak_memory_gib",
    "warmup_s", "compile_s", "engine", "kernels",
}


def run_cli(args, stdin=None, timeout=600, cache=None):
    env = dict(ENV)
    if cache is not None:
        env["MISTRAL_T4_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "mistral_t4", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_bench_prints_report_and_json_last_line(tmp_path, model_cache, tiny_random_path):
    out = tmp_path / "report.json"
    proc = run_cli(["bench", "--model", "tiny-random", "--quant", "fp32", "--requests", "5", "--prompt-tokens", "12",
                    "--new-tokens", "6", "--json", str(out), "--no-progress"], cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    report = json.loads(last)
    assert json.loads(out.read_text()) == report
    assert set(report["engines"]) == {"mistral_t4", "hf-dynamic", "hf-static"}
    for name, engine in report["engines"].items():
        assert REPORT_FIELDS <= set(engine), (name, REPORT_FIELDS - set(engine))
        assert engine["requests_ok"] == engine["requests_total"] == 5
        assert engine["output_tokens"] == 5 * 6 and engine["prompt_tokens"] == 5 * 12
        assert engine["total_tokens_per_s"] > engine["output_tokens_per_s"] > 0
    assert report["workload"] == {"requests": 5, "prompt_tokens": 12, "new_tokens": 6, "greedy": True,
                                  "ignore_eos": True}
    assert report["system"]["torch"] and report["system"]["transformers"]
    assert "PROJECTION" in report["t4_projection"]["label"]
    assert "speedup" in report
    assert "mistral_t4" in proc.stdout and "out tok/s" in proc.stdout  # the human report


def test_bench_default_on_cpu_runs_builtin_model_and_says_so(smollm2_path, model_cache):
    proc = run_cli(["bench", "--no-progress", "--engines", "mistral_t4,hf-dynamic"], cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU: small CPU workload" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["model"] == "smollm2-mistral"
    assert report["engines"]["mistral_t4"]["requests_ok"] == 8


def test_bench_rejects_bad_arguments():
    proc = run_cli(["bench", "--requests", "0"])
    assert proc.returncode == 2 and "must be > 0" in proc.stderr
    proc = run_cli(["bench", "--engines", "mistral_t4,warp-drive", "--model", "tiny-random"])
    assert proc.returncode == 2 and "unknown engine" in proc.stderr
    proc = run_cli(["bench", "--model", "no such thing!"])
    assert proc.returncode == 2 and "smollm2-mistral" in proc.stderr  # the error lists accepted forms


@pytest.mark.parametrize("engine", ["mistral_t4", "hf"])
def test_chat_answers_paris_and_keeps_history(engine, smollm2_path, model_cache):
    script = "What is the capital of France?\nAnd what is the capital of Italy?\n/reset\nexit\n"
    proc = run_cli(["chat", "--quant", "fp32", "--engine", engine, "--max-new-tokens", "24"], stdin=script,
                   cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = proc.stdout.split("assistant: ")[1:]
    assert len(answers) == 2
    assert "Paris" in answers[0]
    assert "Rome" in answers[1]
    assert "(history cleared)" in answers[1]


def test_chat_ends_on_eof_and_reports_bad_adapter(model_cache, tiny_random_path):
    proc = run_cli(["chat", "--model", "tiny-random", "--quant", "fp32", "--max-new-tokens", "4"], stdin="hello\n",
                   cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("assistant: ") == 1
    assert "kernels: nf4_linear=reference (dequantize + F.linear), decode_attention=reference" in proc.stderr  # at load
    proc = run_cli(["chat", "--model", "tiny-random", "--quant", "fp32", "--adapter", "nope"], stdin="",
                   cache=model_cache)
    assert proc.returncode == 2 and "unknown adapter 'nope'" in proc.stderr
