"""The benchmark: our engine and the Hugging Face baselines on one workload, in one process.

    python -m mistral_t4 bench --model random-7b --memory-cap-gib 15 --sweep 1,8,32,64,128

Loads the model once in NF4, runs W32 (see `workload.py`) through our engine and through
HF `generate` with a dynamic and a static cache, optionally fp16 baselines, a batch sweep
and batch-1 latency; prints a report and, as the last line of stdout, one JSON document
(also written to --json). With no GPU it runs the built-in model on a small workload.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field

import torch

from mistral_t4 import devices, kernels, loading, models, roofline
from mistral_t4.engine import Engine
from mistral_t4.hf_engine import HFEngine
from mistral_t4.model import FastMistral
from mistral_t4.worker import Worker
from mistral_t4.workload import make_prompts, run_workload

ENGINES = {
    "mistral_t4": "our engine: lean forward, static cache, compiled decode step, slot refill",
    "hf-dynamic": "HF generate, same weights, dynamic cache",
    "hf-static": "HF generate, same weights, static cache (the usual recipe)",
    "hf-fp16": "HF generate, fp16 weights, dynamic cache (loads a second model; skipped where it does not fit)",
    "hf-fp16-static-compiled": "HF generate, fp16 weights, static cache, compiled by transformers "
                               "(torch >= 2.12: older cudagraph trees assert in a worker thread, pytorch#123177)",
}
CPU_WORKLOAD = {"requests": 8, "prompt_tokens": 32, "new_tokens": 16}


@dataclass
class BenchConfig:
    model: str | None = None
    quant: str = "nf4"
    requests: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    engines: tuple[str, ...] = ("mistral_t4", "hf-dynamic", "hf-static")
    memory_cap_gib: float | None = None
    compile: bool | None = None
    sweep: tuple[int, ...] = ()
    batch1_tokens: int = 0  # >0: also time one request of prompt_tokens -> batch1_tokens new tokens
    lora: list[str] = field(default_factory=list)
    device: str | None = None
    json_path: str | None = None
    progress: bool = True
    seed: int = 0


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
    device = devices.pick_device(cfg.device)
    notes = []
    if device.type == "cpu" and cfg.requests is None:
        notes.append("no GPU: small CPU workload "
                     + " x ".join(f"{k}={v}" for k, v in CPU_WORKLOAD.items()) + " (pass --requests etc. to change)")
    defaults = CPU_WORKLOAD if device.type == "cpu" else {"requests": 32, "prompt_tokens": 128, "new_tokens": 128}
    n = cfg.requests or defaults["requests"]
    prompt_len = cfg.prompt_tokens or defaults["prompt_tokens"]
    new = cfg.new_tokens or defaults["new_tokens"]
    spec = cfg.model or models.default_spec(device)
    if cfg.model is None:
        notes.append(f"model: {spec} (default for {device.type})")
    unknown = [e for e in cfg.engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    devices.set_memory_cap(device, cfg.memory_cap_gib)
    for note in notes:
        log(f"[bench] {note}")

    load_start = time.perf_counter()
    model, tokenizer = loading.load(spec, quant=cfg.quant, lora=cfg.lora or None, device=device,
                                    memory_cap_gib=cfg.memory_cap_gib, seed=cfg.seed)
    load_s = time.perf_counter() - load_start
    config = loading.base_model(model).config
    weight_bytes = loading.footprint_bytes(model)
    log(f"[bench] loaded {spec} ({cfg.quant}) in {load_s:.1f} s: {weight_bytes / devices.GIB:.2f} GiB of weights")
    bandwidth = roofline.measure_bandwidth(device)
    prompts = make_prompts(tokenizer, n, prompt_len, cfg.seed)
    report = {
        "workload": {"requests": n, "prompt_tokens": prompt_len, "new_tokens": new, "greedy": True,
                     "ignore_eos": True},
        "model": spec, "quant": cfg.quant, "lora": list(cfg.lora),
        "memory_cap_gib": cfg.memory_cap_gib,
        "load_s": round(load_s, 2),
        "weight_gib": round(weight_bytes / devices.GIB, 3),
        "system": devices.describe(device),
        "notes": notes,
        "engines": {},
    }
    floor = None
    if bandwidth:
        floor = roofline.work_floor(config, weight_bytes, n, prompt_len, new, bandwidth,
                                    _matmul_tflops(device))
        report["bandwidth_gbs"] = bandwidth
        report["floor"] = floor
    fast = None
    for name in cfg.engines:
        if name.startswith("hf-fp16"):
            continue
        if name == "mistral_t4":
            fast = fast or FastMistral.from_hf(model, decode_rows=n)
            engine = Engine(fast, tokenizer, max_batch=n, max_len=prompt_len + new, compile=cfg.compile,
                            memory_cap_gib=cfg.memory_cap_gib,
                            generation_config=loading.base_model(model).generation_config)
            log(f"[bench] {engine.kernels_line()}" + (f", {plans}" if (plans := fast.nf4_cuda_plans(n)) else ""))
        else:
            engine = HFEngine(model, tokenizer, max_batch=n, cache=name.split("-")[1])
        report["engines"][name] = _run_engine(engine, prompts, new, cfg.progress, log, floor, name)
        del engine
        _free(device)
    runs = ([("batch1", 1)] if cfg.batch1_tokens else []) + [("sweep", b) for b in cfg.sweep]
    for kind, rows in runs:  # each with the kernels an engine of that many slots gets
        choice = kernels.select_kernels(device, decode_rows=rows, shapes=kernels.nf4_shapes(config))
        if fast is None or fast.kernel_choice != choice:
            fast = None  # the other layout's weight copies go first
            _free(device)
            fast = FastMistral.from_hf(model, choice)
            log(f"[bench] kernels for {rows} rows: {choice}")
        if kind == "batch1":
            report["batch1"] = _batch1(fast, tokenizer, prompt_len, cfg, config, weight_bytes, bandwidth, log)
        else:
            report.setdefault("sweep", []).append(_sweep_point(fast, tokenizer, rows, prompt_len, new, cfg, log))
    fp16 = [e for e in cfg.engines if e.startswith("hf-fp16")]
    if fp16:
        del fast, model
        _free(device)
        report["engines"].update(_fp16_baselines(fp16, spec, tokenizer, prompts, new, device, cfg, log, floor))
    _ratios(report)
    report["t4_projection"] = _t4_projection(config, weight_bytes, n, prompt_len, new, report)
    print_report(report, log)
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _run_engine(engine, prompts, new, progress, log, floor, name) -> dict:
    log(f"[bench] {name}: warm-up")
    warm_start = time.perf_counter()
    compile_s = engine.warmup()
    with Worker(engine) as worker:
        run_workload(worker, prompts[:2], min(new, 4), progress=False)  # first-call costs stay out
        warmup_s = time.perf_counter() - warm_start
        log(f"[bench] {name}: warm-up {warmup_s:.1f} s (compile {compile_s:.1f} s); running")
        result = run_workload(worker, prompts, new, progress=progress, label=name)
    result.update(engine.describe(), warmup_s=round(warmup_s, 2), compile_s=round(compile_s, 2))
    if floor:
        result.update(roofline.efficiency(result, floor, new))
    log(f"[bench] {name}: {result['output_tokens_per_s']} output tok/s, "
        f"{result['requests_ok']}/{result['requests_total']} ok")
    return result


def _sweep_point(fast, tokenizer, batch, prompt_len, new, cfg, log) -> dict:
    try:
        engine = Engine(fast, tokenizer, max_batch=batch, max_len=prompt_len + new, compile=cfg.compile,
                        memory_cap_gib=cfg.memory_cap_gib)
        prompts = make_prompts(tokenizer, batch, prompt_len, cfg.seed + batch)
        result = _run_engine(engine, prompts, new, False, log, None, f"sweep batch {batch}")
        point = {"batch": batch, **{k: result[k] for k in (
            "output_tokens_per_s", "total_tokens_per_s", "peak_memory_gib", "token_latency_p50_ms",
            "requests_ok", "wall_s")}, "nf4_linear": fast.kernel_choice.get("nf4_linear"),
            "norms_in_matmuls": fast.folds_norms(batch)}
    except (MemoryError, torch.OutOfMemoryError) as error:
        point = {"batch": batch, "error": f"{type(error).__name__}: {error}"}
    _free(fast.device)
    return point


def _batch1(fast, tokenizer, prompt_len, cfg, config, weight_bytes, bandwidth, log) -> dict:
    new = cfg.batch1_tokens
    engine = Engine(fast, tokenizer, max_batch=1, max_len=prompt_len + new, compile=cfg.compile,
                    memory_cap_gib=cfg.memory_cap_gib)
    result = _run_engine(engine, make_prompts(tokenizer, 1, prompt_len, cfg.seed), new, False, log, None, "batch 1")
    out = {"prompt_tokens": prompt_len, "new_tokens": new, **{k: result[k] for k in (
        "output_tokens_per_s", "token_latency_p50_ms", "token_latency_p99_ms", "ttft_p50_s", "wall_s")},
        "kernels": dict(fast.kernel_choice), "norms_in_matmuls": fast.folds_norms(1)}
    if bandwidth and result["token_latency_p50_ms"]:
        step_bytes = roofline.decode_bytes_per_step(config, weight_bytes, 1, prompt_len + new / 2)
        floor_ms = step_bytes / (bandwidth * 1e9) * 1000
        out.update(floor_step_ms=round(floor_ms, 4), pct_of_floor=round(100 * floor_ms / result["token_latency_p50_ms"], 1))
    _free(fast.device)
    return out


def _fp16_baselines(names, spec, tokenizer, prompts, new, device, cfg, log, floor) -> dict:
    out = {}
    if device.type != "cuda":
        return {name: {"skipped": "fp16 baselines need a GPU"} for name in names}
    devices.set_memory_cap(device, None)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    try:
        model, _ = loading.load(spec, quant="fp16", device=device, seed=cfg.seed)
    except (MemoryError, torch.OutOfMemoryError) as error:
        return {name: {"skipped": f"fp16 does not fit: {error}"} for name in names}
    for name in names:
        compiled = name.endswith("compiled")
        engine = HFEngine(model, tokenizer, max_batch=len(prompts), cache="static" if "static" in name else "dynamic",
                          compile=compiled)
        out[name] = _run_engine(engine, prompts, new, cfg.progress, log, floor, name)
        out[name]["note"] = "fp16 weights, no memory cap (over a T4's 16 GB where peak_memory_gib says so)"
    del model
    _free(device)
    return out


def _ratios(report: dict) -> None:
    ours = report["engines"].get("mistral_t4", {}).get("output_tokens_per_s")
    if not ours:
        return
    report["speedup"] = {
        name: round(ours / r["output_tokens_per_s"], 2)
        for name, r in report["engines"].items()
        if name != "mistral_t4" and r.get("output_tokens_per_s")
    }


def _t4_projection(config, weight_bytes, n, prompt_len, new, report) -> dict:
    """What the same bytes and FLOPs imply on a T4, at the fraction of the floor measured here. Not a measurement."""
    t4 = roofline.work_floor(config, weight_bytes, n, prompt_len, new, roofline.T4["bandwidth_gbs"],
                             roofline.T4["fp16_tflops"])
    out = {"label": "PROJECTION for an NVIDIA T4 (320 GB/s, 65 fp16 TFLOP/s), not a measurement", **t4}
    pct = report["engines"].get("mistral_t4", {}).get("pct_of_floor")
    if pct:
        out["projected_output_tokens_per_s_at_measured_efficiency"] = round(
            t4["output_tokens_per_s_ceiling"] * pct / 100, 1)
    return out


def _matmul_tflops(device) -> float:
    """Dense fp16 rate to bound prefill: a measured 4096^3 matmul (the CPU gets a nominal 1 TFLOP/s)."""
    if device.type != "cuda":
        return 1.0
    a = torch.randn(4096, 4096, dtype=torch.float16, device=device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize(device)
    return round(20 * 2 * 4096**3 / (time.perf_counter() - start) / 1e12, 1)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_report(report: dict, log=print) -> None:
    w = report["workload"]
    system = report["system"]
    log("")
    log(f"== mistral_t4 benchmark: {report['model']} ({report['quant']}) on {system['card']} ==")
    log(f"workload: {w['requests']} requests x {w['prompt_tokens']} prompt -> {w['new_tokens']} new tokens, greedy")
    log(f"versions: torch {system['torch']}, transformers {system['transformers']}, "
        f"bitsandbytes {system['bitsandbytes']}, driver {system['driver']}")
    if system.get("settings"):
        log("settings: " + ", ".join(f"{k}={v}" for k, v in system["settings"].items()))
    header = f"{'engine':<26}{'ok':>7}{'out tok/s':>11}{'all tok/s':>11}{'wall s':>9}{'TTFT p50':>10}" \
             f"{'tok p50 ms':>11}{'tok p99 ms':>11}{'peak GiB':>10}{'warm-up s':>10}"
    log(header)
    for name, r in report["engines"].items():
        if "skipped" in r:
            log(f"{name:<26}skipped: {r['skipped']}")
            continue
        log(f"{name:<26}{r['requests_ok']:>3}/{r['requests_total']:<3}{_f(r['output_tokens_per_s']):>11}"
            f"{_f(r['total_tokens_per_s']):>11}{_f(r['wall_s'], 2):>9}{_f(r['ttft_p50_s'], 3):>10}"
            f"{_f(r['token_latency_p50_ms'], 2):>11}{_f(r['token_latency_p99_ms'], 2):>11}"
            f"{_f(r['peak_memory_gib'], 2):>10}{_f(r['warmup_s'], 1):>10}")
    if report.get("speedup"):
        log("speedup of mistral_t4: " + ", ".join(f"{v}x vs {k}" for k, v in report["speedup"].items()))
    if report.get("floor"):
        ours = report["engines"].get("mistral_t4", {})
        log(f"floor: {report['floor']['floor_s']} s at {report['bandwidth_gbs']} GB/s measured copy bandwidth "
            f"({report['floor']['bytes_per_decode_step_gb']} GB per decode step); mistral_t4 reached "
            f"{ours.get('pct_of_floor')}% of it, decode at {ours.get('achieved_decode_gbs')} GB/s")
    for point in report.get("sweep", []):
        log(f"sweep batch {point['batch']:>4}: " + (point.get("error") or
            f"{point['output_tokens_per_s']} out tok/s, peak {point['peak_memory_gib']} GiB"))
    if report.get("batch1"):
        b = report["batch1"]
        log(f"batch 1: {b['token_latency_p50_ms']} ms/token p50"
            + (f" ({b['pct_of_floor']}% of the {b['floor_step_ms']} ms floor)" if "pct_of_floor" in b else ""))
    t4 = report["t4_projection"]
    log(f"{t4['label']}: ceiling {t4['output_tokens_per_s_ceiling']} out tok/s"
        + (f", ~{t4['projected_output_tokens_per_s_at_measured_efficiency']} at the efficiency measured here"
           if "projected_output_tokens_per_s_at_measured_efficiency" in t4 else ""))


def _f(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"
