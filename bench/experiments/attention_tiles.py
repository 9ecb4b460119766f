"""Experiment: tiles, warps, stages and splits of the decode attention kernel at the engine's sizes.

    python bench/experiments/attention_tiles.py     # on a CUDA GPU; writes $OUT/attention_tiles.json

The decode step's attention (`decode_attention_rotary`: rotary, cache write, attention, and the merge of the
splits) is launched with the package's defaults: 64 positions per tile, 4 warps, 2 stages, splits from
`default_num_splits` (one split once rows x KV heads fill the SMs). In a 32-row decode step it is ~11.5 us per
layer where its ~12.6 MB of cache (32 rows x 192 positions x 8 KV heads) would take ~3 us at the copy rate
(bench/results/h200_2026-11-27_s10_scale_a/step_profile_rows1_rows32.json). This times every combination on the
step's shapes (Mistral-7B heads, a 256-position cache, rows at position 191 and one at 149), each checked
against the fp32 reference, with the L2 flushed before each call.

Results (H200, attention_tiles_h200_2026-11-27.json; 81 combinations per size, all within 1e-2 of the reference):
the package's launch is the best or within 3% at 1, 32 and 64 rows (5.93 / 12.09 / 17.50 us against the best
5.83 / 11.70 / 17.50); at 8 rows one split instead of four would take 8.42 -> 7.57 us (1% of an 8-row step). So
tiles, warps, stages and splits are not what holds the 32-row attention at ~1 TB/s: each program (one per row
and KV head) walks its three 64-position tiles one after another, and more programs (splits) cost their merge.
Not changed.
"""
import itertools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import rel_error, timer, write_record

    from mistral_t4.kernels import attention_triton, multiprocessor_count
    from mistral_t4.kernels.attention import decode_attention_rotary_reference

    dev = torch.device("cuda")
    time_ms = timer(dev)
    n_heads, n_kv, head_dim, max_len = 32, 8, 128, 256
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=dev) / head_dim))
    emb = torch.outer(torch.arange(max_len, dtype=torch.float, device=dev), inv_freq).repeat(1, 2)
    cos, sin = emb.cos().half(), emb.sin().half()
    scale = head_dim ** -0.5
    results, failures = [], 0
    for batch in (1, 8, 32, 64):
        qkv = torch.randn(batch, (n_heads + 2 * n_kv) * head_dim, device=dev, dtype=torch.float16)
        k = torch.randn(batch, n_kv, max_len, head_dim, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        positions = torch.full((batch,), 191, dtype=torch.long, device=dev)
        positions[0] = 149
        ref = decode_attention_rotary_reference(qkv.float(), k.float(), v.float(), positions, cos.float(), sin.float(),
                                                n_heads, scale)
        default = attention_triton.default_num_splits(batch * n_kv, max_len, multiprocessor_count(dev))
        rows = []
        for splits, block_len, warps, stages in itertools.product((1, 2, 4), (32, 64, 128), (2, 4, 8), (1, 2, 3)):
            if block_len * splits > max_len:
                continue

            def fn():
                return attention_triton.decode_attention_rotary(qkv, k, v, positions, cos, sin, n_heads, scale,
                                                                num_splits=splits, block_len=block_len,
                                                                num_warps=warps, num_stages=stages)
            try:
                err = rel_error(fn(), ref)
                ms = time_ms(fn)
            except Exception as e:  # e.g. out of shared memory for a large tile at 3 stages
                rows.append(dict(splits=splits, block_len=block_len, warps=warps, stages=stages, error=str(e)[:200]))
                continue
            failures += err > 1e-2
            rows.append(dict(splits=splits, block_len=block_len, warps=warps, stages=stages, us=round(ms * 1e3, 2),
                             rel_err=err))
        timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        package = next(r for r in rows if (r["splits"], r["block_len"], r["warps"], r["stages"]) == (default, 64, 4, 2))
        print(f"batch {batch}: package ({default} splits, 64, 4 warps, 2 stages) {package['us']} us; best "
              + "; ".join(f"{r['us']} us {r['splits']}x{r['block_len']} w{r['warps']} s{r['stages']}" for r in timed[:5]),
              flush=True)
        results.append(dict(batch=batch, default_splits=default, package_us=package["us"], best=timed[:5], all=rows))
    print("failures", failures)
    write_record("attention_tiles", failures=failures, results=results)


if __name__ == "__main__":
    main()
