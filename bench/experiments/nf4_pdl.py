"""Experiment: programmatic dependent launch (sm90) for the batch-1 CUDA NF4 kernel.

    python bench/experiments/nf4_pdl.py      # on an sm90 GPU; writes $OUT/nf4_pdl.json

At 1 row the kernel's bare weight stream is three quarters of its time and a 4-58 MB kernel
spends microseconds filling and draining the memory pipeline (nf4_stream.py). With
programmatic dependent launch (`nf4_matmul(..., early=True)`) a grid may start its CTAs while
the previous grid's last CTAs finish, if that grid lets it (`griddepcontrol.launch_dependents`,
which the package's kernel issues after its main loop): the new CTAs load their weights and
build their table, then wait (`griddepcontrol.wait`) for the previous grid before reading x.

This script times 8 layers of the decode step's NF4 matmuls at 1 row (qkv, o, gate_up, down)
in one CUDA graph, with and without early launch, (a) back to back and (b) with a small PyTorch
kernel before each matmul that rewrites its input (as RMSNorm or SiLU-mul would; those do not
let a dependent start early, so (b) shows what the engine as it is could gain), and checks
that the outputs are the same bits either way.

Results (H200, nf4_pdl_h200_2026-11-26.json; same bits with and without early launch, inside a
CUDA graph too): back to back 61.7 -> 55.1 us per layer (1.99 -> 2.23 TB/s of NF4, -11%); with a
PyTorch kernel before each matmul 68.3 -> 66.4 (-3%), and those kernels themselves cost ~1.6 us
each. So early launch pays where our kernels follow each other: the elementwise work between
them (RMSNorm, rotary, SiLU-mul) would have to move into the kernels (e.g. SiLU-mul into the
down projection's x loads) for the engine to get the 11%. Not used by the engine: launching
every CUDA NF4 matmul of the engine early (a trial in session 7, behind an environment switch,
results in bench/results/h200_2026-11-26_s7_early_launch/) made it slower on the H200, batch 1
2.674 / 2.677 -> 2.745 ms per token and W32 6,304 / 6,259 -> 6,213 output tok/s (same call,
plain runs before and after), with the engine's logits unchanged (gpu_check.json there); the
trial was dropped.
Since session 9 the engine does use it: the kernels between the matmuls moved into kernels of
ours that take part in the chain (SiLU into gate/up's epilogue, the residual add + RMSNorm and the
attention kernels in Triton with `launch_pdl`), and every CUDA NF4 matmul of the decode step is
launched early: batch 1 2.52 -> 2.18 ms per token, W32 6,390 -> 6,720 output tok/s (H200,
bench/results/h200_2026-11-27_s9_swiglu_early/, h200_2026-11-27_s9_norm_chain/).
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    from gpu_kernels import DECODE_SHAPES, MISTRAL_SHAPES, random_param, timer, write_record

    from mistral_t4.kernels import NF4Weight, nf4_cuda

    dev = torch.device("cuda")
    time_ms = timer(dev)
    shapes = [(k, n) for name, k, n in MISTRAL_SHAPES if name in DECODE_SHAPES]
    layers = [[NF4Weight.from_bnb(random_param(k, n, dev), backend="cuda") for k, n in shapes] for _ in range(8)]
    nbytes = sum(w.packed.numel() + w.absmax.numel() * 4 for layer in layers for w in layer)
    xs = {k: torch.randn(1, k, device=dev, dtype=torch.float16) for k, _ in shapes}
    start = {k: x.clone() for k, x in xs.items()}
    outs = [[torch.empty(1, n, device=dev, dtype=torch.float16) for _, n in shapes] for _ in layers]

    def sequence(early, between):
        for layer, out in zip(layers, outs):
            for (k, _), w, o in zip(shapes, layer, out):
                if between:  # rewrites the matmul's input: the matmul must wait for it
                    torch.mul(xs[k], 1.0009765625, out=xs[k])
                nf4_cuda.nf4_matmul(xs[k], w.packed, w.absmax, w.code_fp16, w.tile_counters, out=o, early=early)

    def result(early, between):
        for k in xs:
            xs[k].copy_(start[k])
        sequence(early, between)
        torch.cuda.synchronize()
        return [o.clone() for out in outs for o in out]

    failures = 0
    for between in (False, True):
        same = all(torch.equal(a, b) for a, b in zip(result(False, between), result(True, between)))
        print(f"between={between}: early launch gives the same bits: {same}", flush=True)
        failures += not same
    rows = []
    for between in (False, True):
        for early in (False, True):
            try:
                ms = time_ms(lambda: sequence(early, between), calls=3)
            except Exception as e:  # e.g. a driver that cannot capture early launches in a graph
                print(f"between={between} early={early}: {type(e).__name__}: {e}", flush=True)
                rows.append(dict(between=between, early=early, error=f"{type(e).__name__}: {e}"))
                failures += 1
                continue
            rows.append(dict(between=between, early=early, ms=ms, per_layer_us=ms * 1e3 / len(layers),
                             tbps=nbytes / ms / 1e9))
            print(f"{'with' if between else 'no'} kernel between, early={early}: {ms * 1e3 / len(layers):.1f} us per layer "
                  f"({nbytes / ms / 1e9:.2f} TB/s of NF4)", flush=True)
    write_record("nf4_pdl", failures=failures, rows=rows, layers=len(layers), nbytes=nbytes)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
