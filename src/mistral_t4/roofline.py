"""How fast the work could possibly go: bytes and FLOPs over the card's bandwidth and rate.

Prefill is compute-bound: ~2 FLOPs per weight per prompt token. Decode is bandwidth-bound:
at batch 32 a step must still read every weight once (NF4 codes + scales ~3.9 GB for a 7B
model, plus the fp16 lm_head) and the live KV cache. Those bytes over the measured memory
bandwidth are the least time a step can take. We report achieved GB/s and the fraction of
this floor, and what the same bytes and FLOPs imply on a T4 (a projection, not a measurement).
"""

from __future__ import annotations

import statistics

import torch

from mistral_t4 import devices

T4 = {"card": "NVIDIA T4", "bandwidth_gbs": 320.0, "fp16_tflops": 65.0}


def decode_bytes_per_step(config, weight_bytes: int, batch: int, context: float, dtype_bytes: int = 2) -> float:
    """Bytes one decode step must read: every weight but the embedding table, plus the live KV cache."""
    embed = config.vocab_size * config.hidden_size * dtype_bytes
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes * batch * context
    weights = weight_bytes - (0 if config.tie_word_embeddings else embed)
    return weights + kv


def flops_per_token(config) -> float:
    """Matmul FLOPs per token (2 per multiply-add), attention scores aside."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    return 2.0 * (config.num_hidden_layers * per_layer + config.vocab_size * hidden)


def work_floor(config, weight_bytes: int, n_requests: int, prompt_tokens: int, new_tokens: int,
             bandwidth_gbs: float, tflops: float) -> dict:
    """Least time W-style work can take on a card of `bandwidth_gbs` and `tflops`: prefill compute + decode bytes."""
    prefill_s = flops_per_token(config) * n_requests * prompt_tokens / (tflops * 1e12)
    steps = max(new_tokens - 1, 0)
    avg_context = prompt_tokens + new_tokens / 2
    step_bytes = decode_bytes_per_step(config, weight_bytes, n_requests, avg_context)
    decode_s = steps * step_bytes / (bandwidth_gbs * 1e9)
    floor = prefill_s + decode_s
    return {
        "bytes_per_decode_step_gb": round(step_bytes / 1e9, 4),
        "prefill_floor_s": round(prefill_s, 4),
        "decode_floor_s": round(decode_s, 4),
        "floor_s": round(floor, 4),
        "output_tokens_per_s_ceiling": round(n_requests * new_tokens / floor, 1) if floor else None,
    }


def measure_bandwidth(device: torch.device, gib: float = 1.0) -> float | None:
    """Device-to-device copy rate in GB/s (bytes read + written), median of several runs."""
    if device.type != "cuda":
        return None
    n = int(gib * devices.GIB) // 2
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    del src, dst
    return round(2 * n * 2 / statistics.median(times[2:]) / 1e9, 1)


def efficiency(report: dict, floor: dict, new_tokens: int) -> dict:
    """For one engine's W-run: achieved decode GB/s and % of the floor (end to end, prefill included).

    Decode time is the wall time after the last first token (when every prefill is done).
    """
    wall = report.get("wall_s")
    if not wall or not report.get("requests_ok"):
        return {}
    decode_s = max(wall - (report.get("ttft_p99_s") or 0.0), 1e-9)
    step_bytes = floor["bytes_per_decode_step_gb"] * 1e9
    return {
        "achieved_decode_gbs": round(step_bytes * max(new_tokens - 1, 0) / decode_s / 1e9, 1),
        "pct_of_floor": round(100 * floor["floor_s"] / wall, 1),
    }
