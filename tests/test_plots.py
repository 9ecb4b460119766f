"""Every figure renders from a benchmark report (GPU-like and CPU-like) without touching pyplot's global state."""

from __future__ import annotations

import copy

import matplotlib
import pytest
from matplotlib.figure import Figure

from mistral_t4 import plots

matplotlib.use("Agg")


def _engine(out_tps, ttft, token_ms, latency, peak, pct=None, gbs=None):
    result = {
        "requests_total": 32, "requests_ok": 32, "errors": [], "output_tokens": 4096, "prompt_tokens": 4096,
        "total_tokens": 8192, "wall_s": round(4096 / out_tps, 2), "output_tokens_per_s": out_tps,
        "total_tokens_per_s": 2 * out_tps, "latency_p50_s": latency, "latency_p99_s": latency * 1.05,
        "ttft_p50_s": ttft, "ttft_p99_s": ttft * 1.3, "token_latency_p50_ms": token_ms,
        "token_latency_p99_ms": token_ms * 1.4, "peak_memory_gib": peak,
    }
    if pct is not None:
        result.update(pct_of_floor=pct, achieved_decode_gbs=gbs)
    return result


def gpu_report() -> dict:
    """The layout of bench.run_benchmark's report, with GPU-like numbers."""
    return {
        "workload": {"requests": 32, "prompt_tokens": 128, "new_tokens": 128, "greedy": True, "ignore_eos": True},
        "model": "mistralai/Mistral-7B-Instruct-v0.2", "quant": "nf4",
        "system": {"device": "cuda:0", "card": "Tesla T4"},
        "engines": {
            "mistral_t4": _engine(610.0, 0.9, 48.0, 7.1, 5.2, 71.5, 228.0),
            "hf-dynamic": _engine(101.0, 1.5, 290.0, 40.2, 6.1, 11.8, 37.0),
            "hf-static": _engine(150.0, 1.4, 200.0, 27.1, 6.4, 17.5, 56.0),
            "hf-fp16": {"skipped": "fp16 does not fit"},
        },
        "bandwidth_gbs": 260.0,
        "floor": {"bytes_per_decode_step_gb": 4.4, "floor_s": 5.2},
        "speedup": {"hf-dynamic": 6.04, "hf-static": 4.07},
        "sweep": [{"batch": 1, "output_tokens_per_s": 25.0, "peak_memory_gib": 4.1},
                  {"batch": 32, "output_tokens_per_s": 610.0, "peak_memory_gib": 5.2},
                  {"batch": 128, "error": "MemoryError: the KV cache does not fit"}],
    }


def cpu_report() -> dict:
    """What a CPU run gives: no floor, no peak memory, no sweep."""
    report = copy.deepcopy(gpu_report())
    report["system"] = {"device": "cpu", "card": "x86_64"}
    del report["floor"], report["bandwidth_gbs"], report["sweep"]
    for result in report["engines"].values():
        result.pop("pct_of_floor", None)
        if "peak_memory_gib" in result:
            result["peak_memory_gib"] = None
    return report


def _titles(fig: Figure) -> str:
    texts = [ax.get_title() for ax in fig.axes]
    if fig._suptitle is not None:
        texts.append(fig._suptitle.get_text())
    return "\n".join(texts)


@pytest.mark.parametrize("make_report, card", [(gpu_report, "Tesla T4"), (cpu_report, "CPU (x86_64)")])
@pytest.mark.parametrize("chart", [plots.throughput_chart, plots.latency_chart, plots.sweep_chart, plots.floor_chart])
def test_report_charts_render_and_name_the_card(make_report, card, chart, tmp_path):
    fig = chart(make_report())
    assert isinstance(fig, Figure)
    assert card in _titles(fig)
    fig.savefig(tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_throughput_chart_labels_speedups_and_skipped_engines():
    fig = plots.throughput_chart(gpu_report())
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert "mistral_t4 is\n6.04x this" in labels and "mistral_t4 is\n4.07x this" in labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mistral_t4", "hf-dynamic", "hf-static"]
    assert "tokens per second" in ax.get_ylabel()
    assert "hf-fp16 skipped" in fig._supxlabel.get_text()


def test_sweep_chart_uses_a_log2_axis_and_marks_failed_batches():
    fig = plots.sweep_chart(gpu_report())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "32", "128"]
    assert any(t.get_text() == "did not fit" for t in ax.texts)
    assert fig.axes[1].get_ylabel() == "peak GPU memory (GiB)"


def test_other_figures_render(tmp_path):
    import bitsandbytes.functional as F
    import torch

    codes = F.get_4bit_type("nf4", device="cpu").tolist()
    figures = {
        "nf4": plots.nf4_codes_chart(codes, weights=torch.randn(64 * 100)),
        "nf4_plain": plots.nf4_codes_chart(codes),
        "memory": plots.memory_chart({"fp16": 14.5e9, "nf4": 3.9e9}, "Mistral-7B", budget_bytes=15 * plots.GIB),
        "steps": plots.step_latency_chart({"eager": [30.0, 31.0, 29.5], "compiled": [12.0, 12.5, 11.9]},
                                          "Tesla T4", compile_s=40.0),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png")
    assert len(codes) == 16
    assert "Tesla T4" in _titles(figures["steps"])
    assert figures["memory"].axes[0].get_ylabel() == "weights (GiB)"


def test_save_all_writes_pngs_without_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    paths = plots.save_all(gpu_report(), tmp_path / "gpu")
    assert [p.name for p in paths] == ["throughput.png", "latency.png", "sweep.png", "floor.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert [p.name for p in plots.save_all(cpu_report(), tmp_path / "cpu")] == [
        "throughput.png", "latency.png", "floor.png"]
    assert plt.get_fignums() == before  # nothing registered with pyplot, nothing leaks
