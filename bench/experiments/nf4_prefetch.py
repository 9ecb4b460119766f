"""Experiment: does reading the next matmul's weights into L2 during the kernels between two matmuls pay?

    python bench/experiments/nf4_prefetch.py      # sm80+ with the CUDA NF4 kernels; writes $OUT/nf4_prefetch.json

In a decode step the four NF4 matmuls of a layer alternate with small kernels (RMSNorm,
rotary, the cache write, attention, SiLU-mul, residual adds: ~20 us per layer at 1 row on an
H200, bench/step_profile.py), during which the DRAM idles; and each matmul of 4-58 MB spends
microseconds filling its memory pipeline (bench/experiments/nf4_stream.py). With a read-ahead,
each matmul, once its own loads are out, asks L2 for part of the next weight
(`nf4_cuda.nf4_matmul(prefetch=...)`, planned by `FastMistral.plan_prefetch` from a byte
budget), so that those lines are on chip when the next matmul starts.

This script builds 8 layers of Mistral-7B-shaped NF4 weights (random bytes: timing only) as
the package's `FastLinear`s, runs them as a decode step does (x -> qkv -> gaps -> o -> gaps ->
gate_up -> gaps -> down -> gaps) in one CUDA graph, with the gaps as `--gaps` small kernels
after each matmul, at 1 / 8 / 32 rows for L2 budgets 0 (off) to 32 MB, and checks that the
read-ahead leaves every output bit-identical. Time per layer in us (8 layers: 1 GB, much more
than L2, so nothing stays warm from one replay to the next).

Results (H200, 60 MB L2; nf4_prefetch_h200_2026-11-27.json, gaps 5,2,1,2): per layer at 1 row
70.0 us without, 70.0 / 69.8 with 4 / 8 MB, 76.3 / 77.3 / 78.3 with 16 / 24 / 32 MB; at 8 rows
79.4 -> 79.2 best, 82.4 at 32 MB; at 32 rows 120.2 -> 119.3 best (within noise). Outputs
identical. The engine (bench/results/h200_2026-11-27_s8_prefetch/, MISTRAL_T4_NF4_PREFETCH_MB
0 / 16 / 32 / 0 / 16 in one call): batch 1 2.609 / 2.647 / 2.702 / 2.612 / 2.646 ms per token,
W32 6,282 / 6,363 / 6,235 / 6,266 / 6,337 output tokens/s. The read-ahead costs at 1 row and
gains at most ~1% at 32: a CTA's prefetches delay its exit (the kernel ends later), and what
the next kernel then finds in L2 does not make up for it. Dropped: the package never had it
on by default; this script and the kernel's prefetch arguments live at the commit that added
them (git log -- bench/experiments/nf4_prefetch.py).
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS_MB = (0, 4, 8, 16, 24, 32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gaps", default="5,2,1,2", help="small kernels after qkv, o, gate_up, down (0,0,0,0: none)")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import MISTRAL_SHAPES, DECODE_SHAPES, write_record

    from mistral_t4.kernels import NF4Weight, nf4_cuda
    from mistral_t4.model import FastLayer, FastLinear, FastMistral

    dev = torch.device("cuda")
    shapes = {name: (k, n) for name, k, n in MISTRAL_SHAPES if name in DECODE_SHAPES}
    code = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                         0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0], device=dev)

    def weight(k, n):
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
        absmax = torch.rand(n, k // 64, device=dev) * 0.05
        counters = torch.zeros(n // 16, dtype=torch.int32, device=dev)
        return NF4Weight(packed, absmax, code, code.half(), counters, 64, "cuda")

    gaps = [int(g) for g in args.gaps.split(",")]
    layers = []
    for _ in range(args.layers):
        qkv, o, gate_up, down = (FastLinear(weight(*shapes[name]), [], False) for name in DECODE_SHAPES)
        layers.append(FastLayer(None, qkv, o, None, gate_up, down))
    model = FastMistral.__new__(FastMistral)
    torch.nn.Module.__init__(model)
    model.layers = torch.nn.ModuleList(layers)

    results, outputs = [], {}
    for m in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(m, 4096, device=dev, dtype=torch.float16) * 0.1
        scratch = [torch.randn(m, 4096, device=dev, dtype=torch.float16) for _ in range(2)]

        def gap(count):  # small kernels standing for norms, rotary, attention, ...
            for _ in range(count):
                torch.add(scratch[0], 1.0, out=scratch[1])

        def step():
            h, outs = x, []
            for layer in layers:
                qkv = layer.qkv(h)
                gap(gaps[0])
                o = layer.o(qkv[:, :4096])
                gap(gaps[1])
                gu = layer.gate_up(o)
                gap(gaps[2])
                h = layer.down(gu[:, :14336]) * 0.01
                gap(gaps[3])
                outs.append(h)
            return outs

        for budget in BUDGETS_MB:
            plan = model.plan_prefetch(budget << 20)
            step()  # the kernels and the plans compiled / cached outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = step()
            graph.replay()
            torch.cuda.synchronize()
            outputs[m, budget] = torch.cat(outs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(5):
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 20)
            ms = sorted(times)[len(times) // 2]
            same = torch.equal(outputs[m, budget], outputs[m, 0])
            results.append(dict(m=m, budget_mb=budget, plan=plan, ms=ms, per_layer_us=ms * 1e3 / args.layers,
                                identical=same))
            print(f"M={m} budget {budget} MB {plan}: {ms * 1e3 / args.layers:.1f} us per layer"
                  f"{'' if same else ' OUTPUT DIFFERS'}", flush=True)
            del graph
    failures = sum(not r["identical"] for r in results)
    print("failures", failures)
    write_record("nf4_prefetch", gaps=gaps, layers=args.layers, failures=failures, results=results,
                 sms=torch.cuda.get_device_properties(dev).multi_processor_count,
                 l2_mb=torch.cuda.get_device_properties(dev).L2_cache_size / 2**20, rows_kernel=nf4_cuda.MAX_ROWS)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
