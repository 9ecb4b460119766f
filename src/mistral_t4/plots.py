"""Figures for the notebooks and the bench/ scripts, from a benchmark report or plain lists.

Every function returns a `matplotlib.figure.Figure` built with the object API and never
touches pyplot: no global figure list to leak into, nothing shown behind the caller's
back. A notebook displays a returned figure as the cell's value (after `%matplotlib
inline`); a script saves it with `fig.savefig(path)` or `save_all(report, directory)`.

The report is the dict `bench.run_benchmark` returns (the same JSON `--json` writes):
`report["engines"][name]` holds one engine's measurements (`output_tokens_per_s`,
`ttft_p50_s`, `token_latency_p99_ms`, `pct_of_floor`, ...), `report["sweep"]` the batch
sweep, `report["system"]["card"]` the card every title names.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

GIB = 1024**3
OURS = "mistral_t4"
# One colour per engine in every figure, so a reader can follow an engine across them.
ENGINE_COLORS = {
    "mistral_t4": "#d62728",
    "hf-dynamic": "#1f77b4",
    "hf-static": "#2ca02c",
    "hf-fp16": "#9467bd",
    "hf-fp16-static-compiled": "#8c564b",
}
SERIES_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def card_name(report: dict) -> str:
    """The card a report was measured on, e.g. "Tesla T4" or "CPU (x86_64)"."""
    return device_label(report.get("system", {}))


def device_label(system: dict) -> str:
    """A `devices.describe()` dict -> the name titles use, e.g. "Tesla T4" or "CPU (x86_64)"."""
    card = system.get("card") or "unknown device"
    return f"CPU ({card})" if str(system.get("device", "")).startswith("cpu") else card


def measured_engines(report: dict) -> dict[str, dict]:
    """Engines that ran (skipped ones left out), in report order."""
    return {name: r for name, r in report.get("engines", {}).items() if "skipped" not in r}


def throughput_chart(report: dict) -> Figure:
    """Output tokens/s per engine, with prompt+output tokens/s beside it and our speedup over each baseline."""
    engines = measured_engines(report)
    fig, ax = _figure(7.5, 4.5)
    x = np.arange(len(engines))
    width = 0.38
    output = [r.get("output_tokens_per_s") or 0.0 for r in engines.values()]
    total = [r.get("total_tokens_per_s") or 0.0 for r in engines.values()]
    colors = [_engine_color(name) for name in engines]
    bars = ax.bar(x - width / 2, output, width, color=colors, label="output tokens/s")
    ax.bar(x + width / 2, total, width, color=colors, alpha=0.35, hatch="//", edgecolor=colors,
           label="prompt + output tokens/s")
    ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=9)
    speedup = report.get("speedup", {})
    top = max(output + total + [1.0])
    for i, name in enumerate(engines):
        if name in speedup:
            ax.annotate(f"{OURS} is\n{speedup[name]:.2f}x this", (x[i], max(output[i], total[i])),
                        xytext=(0, 16), textcoords="offset points", ha="center", va="bottom", fontsize=9,
                        fontweight="bold", color=_engine_color(OURS))
    ax.set_ylim(0, top * 1.35)
    ax.set_xticks(x, list(engines))
    ax.set_ylabel("tokens per second")
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Throughput: {_workload(report)}\n{report.get('model')} ({report.get('quant')}) "
                 f"on {card_name(report)}", fontsize=11)
    _footnote(fig, _skipped(report))
    return fig


def latency_chart(report: dict) -> Figure:
    """p50 and p99 per engine of time to first token, per-token latency and whole-request latency."""
    engines = measured_engines(report)
    panels = [
        ("time to first token", "seconds", "ttft_p50_s", "ttft_p99_s"),
        ("per-token latency", "milliseconds", "token_latency_p50_ms", "token_latency_p99_ms"),
        ("request latency", "seconds", "latency_p50_s", "latency_p99_s"),
    ]
    fig = Figure(figsize=(12, 4.3), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.arange(len(engines))
    width = 0.38
    for ax, (title, unit, p50_key, p99_key) in zip(axes, panels):
        p50 = [r.get(p50_key) or 0.0 for r in engines.values()]
        p99 = [r.get(p99_key) or 0.0 for r in engines.values()]
        colors = [_engine_color(name) for name in engines]
        low = ax.bar(x - width / 2, p50, width, color=colors, label="p50")
        high = ax.bar(x + width / 2, p99, width, color=colors, alpha=0.35, hatch="//", edgecolor=colors,
                      label="p99")
        ax.bar_label(low, fmt=_short, padding=2, fontsize=8)
        ax.bar_label(high, fmt=_short, padding=2, fontsize=8)
        ax.set_ylim(0, max(p50 + p99 + [1e-9]) * 1.2)
        ax.set_xticks(x, list(engines), rotation=20, ha="right")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle(f"Latency (lower is better): {_workload(report)} on {card_name(report)}", fontsize=11)
    return fig


def sweep_chart(report: dict) -> Figure:
    """Output tokens/s and peak GPU memory against batch size (log2 axis); failed batches marked."""
    points = report.get("sweep") or []
    title = f"Batch sweep: {report.get('model')} ({report.get('quant')}) on {card_name(report)}"
    if not points:
        return _message_figure(title, "No batch sweep in this report (BenchConfig.sweep was empty).")
    ok = [p for p in points if "error" not in p]
    failed = [p for p in points if "error" in p]
    fig, ax = _figure(7.5, 4.5)
    batches = [p["batch"] for p in ok]
    rate = [p["output_tokens_per_s"] or 0.0 for p in ok]
    ax.plot(batches, rate, marker="o", color=_engine_color(OURS), label="output tokens/s")
    for b, r in zip(batches, rate):
        ax.annotate(f"{r:.0f}", (b, r), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    for p in failed:
        ax.axvline(p["batch"], color="grey", linestyle=":")
        ax.annotate("did not fit" if "Memory" in p["error"] else "failed", (p["batch"], 0),
                    xytext=(3, 10), textcoords="offset points", rotation=90, fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    all_batches = sorted(p["batch"] for p in points)
    ax.set_xticks(all_batches, [str(b) for b in all_batches])
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("output tokens per second")
    ax.set_ylim(0, max(rate + [1.0]) * 1.2)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    memory = [p.get("peak_memory_gib") for p in ok]
    if any(m is not None for m in memory):
        mem_ax = ax.twinx()
        mem_ax.plot(batches, [m if m is not None else np.nan for m in memory], marker="s", linestyle="--",
                    color="#555555", label="peak GPU memory")
        mem_ax.set_ylabel("peak GPU memory (GiB)")
        mem_ax.set_ylim(0, max(m for m in memory if m is not None) * 1.3)
        more_handles, more_labels = mem_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    else:
        _footnote(fig, "peak memory is only measured on a GPU")
    ax.legend(handles, labels, loc="upper left", fontsize=9)
    w = report.get("workload", {})
    ax.set_title(f"{title}\n{w.get('prompt_tokens')} prompt -> {w.get('new_tokens')} new tokens per request",
                 fontsize=11)
    return fig


def floor_chart(report: dict) -> Figure:
    """Per engine: the bandwidth floor's share of the measured wall time (100% = as fast as the bytes allow)."""
    title = f"Distance to the bandwidth floor on {card_name(report)}"
    floor = report.get("floor")
    engines = {name: r for name, r in measured_engines(report).items() if r.get("pct_of_floor") is not None}
    if not floor or not engines:
        return _message_figure(
            title, "No bandwidth floor in this report: it is measured on a GPU only\n"
                   "(device-to-device copy rate; see roofline.py).")
    fig, ax = _figure(7.5, 1.4 + 0.6 * len(engines))
    names = list(engines)
    pct = [engines[n]["pct_of_floor"] for n in names]
    y = np.arange(len(names))
    bars = ax.barh(y, pct, color=[_engine_color(n) for n in names])
    labels = [f"{p:.1f}%  ({engines[n].get('achieved_decode_gbs', '?')} GB/s decode)" for n, p in zip(names, pct)]
    ax.bar_label(bars, labels=labels, padding=3, fontsize=9)
    ax.axvline(100, color="black", linestyle="--", linewidth=1)
    ax.annotate("floor", (100, len(names) - 0.5), xytext=(3, 0), textcoords="offset points", fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(pct + [100]) * 1.45)
    ax.set_xlabel("% of the floor (floor time / measured wall time)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{title}\nfloor {floor['floor_s']} s: {floor['bytes_per_decode_step_gb']} GB per decode step at "
                 f"{report.get('bandwidth_gbs')} GB/s", fontsize=11)
    return fig


def memory_chart(sizes: dict[str, float], title: str, budget_bytes: float | None = None,
                 budget_label: str = "memory budget") -> Figure:
    """Bars of bytes per format (e.g. {"fp16": ..., "nf4": ...}), in GiB, with an optional budget line."""
    fig, ax = _figure(6.5, 4.2)
    names = list(sizes)
    gib = [sizes[n] / GIB for n in names]
    palette = {"fp32": "#7f7f7f", "fp16": "#1f77b4", "nf4": "#d62728"}
    colors = [next((c for key, c in palette.items() if key in n.lower()), "#2ca02c") for n in names]
    bars = ax.bar(names, gib, color=colors, width=0.55)
    ax.bar_label(bars, labels=[_gib_label(g) for g in gib], padding=2, fontsize=9)
    top = max(gib + [1e-9])
    if budget_bytes is not None:
        ax.axhline(budget_bytes / GIB, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"{budget_label} ({budget_bytes / GIB:.1f} GiB)", (0.01, budget_bytes / GIB),
                    xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points", fontsize=9)
        top = max(top, budget_bytes / GIB)
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel("weights (GiB)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11)
    return fig


def step_latency_chart(series: dict[str, list[float]], card: str, compile_s: float | None = None) -> Figure:
    """Per-step decode latency (ms) in step order, one line per variant (e.g. eager, compiled), medians dashed."""
    fig, ax = _figure(8, 4.5)
    top = 0.0
    for color, (label, values) in zip(SERIES_COLORS, series.items()):
        values = list(values)
        if not values:
            continue
        median = float(np.median(values))
        ax.plot(np.arange(1, len(values) + 1), values, marker=".", linewidth=1, color=color,
                label=f"{label} (median {median:.2f} ms)")
        ax.axhline(median, color=color, linestyle="--", linewidth=1, alpha=0.8)
        top = max(top, float(np.percentile(values, 98)))
    ax.set_ylim(0, top * 1.3 if top else 1.0)
    ax.set_xlabel("decode step")
    ax.set_ylabel("step latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    subtitle = f"\ncompile + graph capture, paid once: {compile_s:.1f} s" if compile_s else ""
    ax.set_title(f"Decode step latency on {card}{subtitle}", fontsize=11)
    return fig


def nf4_codes_chart(codes, weights=None, blocksize: int = 64) -> Figure:
    """The 16 NF4 code values against the uniform 4-bit grid, over the weights they encode if given.

    `weights`: any 1-D array of real weights; each block of `blocksize` is divided by its
    largest magnitude (its scale), which is what NF4 stores the codes relative to.
    """
    codes = np.asarray(codes, dtype=np.float64)
    fig, ax = _figure(9, 4.5)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).ravel()
        w = w[: len(w) // blocksize * blocksize].reshape(-1, blocksize)
        scaled = (w / np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12)).ravel()
        ax.hist(scaled, bins=120, range=(-1, 1), density=True, color="#bbbbbb",
                label=f"weights / block scale (blocks of {blocksize})")
    uniform = np.linspace(-1, 1, 16)
    ymax = ax.get_ylim()[1] if weights is not None else 1.0
    ax.vlines(codes, 0, ymax, color="#d62728", linewidth=1.2, label="NF4 code values (16)")
    ax.plot(uniform, np.full(16, -0.06 * ymax), "|", color="#1f77b4", markersize=12, markeredgewidth=2,
            label="uniform 4-bit grid (for comparison)")
    for i, c in enumerate(codes):
        ax.annotate(str(i), (c, ymax), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8,
                    color="#d62728")
    ax.set_ylim(-0.12 * ymax, ymax * 1.08)
    ax.set_xlim(-1.08, 1.08)
    ax.set_xlabel("value relative to the block scale (absmax)")
    ax.set_ylabel("density of weights" if weights is not None else "")
    if weights is None:
        ax.set_yticks([])
    fig.legend(loc="outside lower center", ncol=3, fontsize=9)
    ax.set_title("NF4: 16 code values, dense near 0 where most weights are", fontsize=11)
    return fig


def save_all(report: dict, directory: str | Path, dpi: int = 120) -> list[Path]:
    """Write throughput.png, latency.png, sweep.png (if swept) and floor.png for `report`; return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {"throughput": throughput_chart(report), "latency": latency_chart(report)}
    if report.get("sweep"):
        figures["sweep"] = sweep_chart(report)
    figures["floor"] = floor_chart(report)
    paths = []
    for name, fig in figures.items():
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _message_figure(title: str, text: str) -> Figure:
    fig, ax = _figure(7.5, 2.2)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, transform=ax.transAxes)
    ax.set_title(title, fontsize=11)
    return fig


def _footnote(fig: Figure, text: str) -> None:
    if text:  # supxlabel: constrained layout makes room for it under the axes
        fig.supxlabel(text, fontsize=8, color="#555555", x=0.01, ha="left")


def _workload(report: dict) -> str:
    w = report.get("workload", {})
    return f"{w.get('requests')} requests x {w.get('prompt_tokens')} prompt -> {w.get('new_tokens')} new tokens"


def _skipped(report: dict) -> str:
    skipped = {n: r["skipped"] for n, r in report.get("engines", {}).items() if "skipped" in r}
    return "; ".join(f"{n} skipped: {why}" for n, why in skipped.items())


def _engine_color(name: str) -> str:
    return ENGINE_COLORS.get(name, "#7f7f7f")


def _short(value: float) -> str:
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{min(digits, 3)}f}"


def _gib_label(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.0f} MiB"
