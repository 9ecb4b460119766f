"""Prefill at new shapes: the first call at each (prompts, length) and the calls after it, on a GPU.

    python bench/prefill_shapes.py [--model random-7b] [--quant nf4] [--warm 128,256]   # JSON to $OUT/prefill_shapes.json

A server sees prompts of many lengths: every new (prompts, padded length) shape is a new
attention call. PyTorch's SDPA prefers cuDNN's kernel on sm90, which builds an execution
plan the first time it sees a shape; `mistral_t4.model.PREFILL_SDPA` leaves cuDNN out. This
times `FastMistral.prefill` at shapes not seen before, first call and two more, with the
package's backends and with every backend enabled (PyTorch's default choice), each on its
own shapes so that neither reuses the other's plans. The elementwise steps are compiled and
warmed first at the `--warm` lengths (by default the engine's: the bucket and twice it), so
first-call costs are attention's and the libraries'; `--warm 128` shows what one warm-up
length left to the first requests (run with TORCH_LOGS=recompiles to see why).
"""

import argparse
import json
import os
import time

import torch
from torch.nn.attention import SDPBackend

from mistral_t4 import devices, loading, model as model_module
from mistral_t4.cache import StaticKVCache
from mistral_t4.model import FastMistral, fused_ops

EVERY_BACKEND = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
# (prompts, length) shapes: disjoint sets, so that each backend choice meets only new shapes
SHAPES = {
    "package": [(2, 128), (6, 128), (7, 256), (11, 128), (31, 128), (3, 384)],
    "pytorch default (cuDNN first)": [(1, 128), (3, 128), (5, 256), (9, 128), (32, 128), (4, 384)],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--warm", default="128,256", help="prefill lengths the fused ops are warmed at")
    args = parser.parse_args()
    warm = tuple(int(v) for v in args.warm.split(","))
    device = torch.device("cuda")
    hf_model, _ = loading.load(args.model, quant=args.quant, device="cuda")
    fast = FastMistral.from_hf(hf_model, decode_rows=32)
    fast.attach_cache(StaticKVCache(fast.config, 32, 512, fast.dtype, device))
    ops = fused_ops()
    fast.warm_prefill_ops(ops, warm)
    vocab = fast.embed.shape[0]

    def prefill_ms(n, length):
        tokens = torch.randint(0, vocab, (n, length), device=device)
        call = (tokens, torch.full((n,), length, device=device), torch.arange(n, device=device),
                torch.full((n,), -1, device=device), ops)
        devices.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            fast.prefill(*call)
        devices.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    package_backends = model_module.PREFILL_SDPA
    prefill_ms(1, 64)  # cuBLAS and the first prefill's own start-up, at a shape neither set uses
    rows = []
    for label, shapes in SHAPES.items():
        model_module.PREFILL_SDPA = package_backends if label == "package" else EVERY_BACKEND
        try:
            for n, length in shapes:
                first, second, third = (prefill_ms(n, length) for _ in range(3))
                rows.append(dict(backends=label, prompts=n, length=length, first_ms=round(first, 1),
                                 then_ms=[round(second, 1), round(third, 1)]))
                print(f"{label:30s} {n:3d} x {length:4d}: first {first:8.1f} ms, then {second:7.1f}, {third:7.1f} ms",
                      flush=True)
        finally:
            model_module.PREFILL_SDPA = package_backends
    report = dict(system=devices.describe(device), model=args.model, quant=args.quant, warm_lengths=warm,
                  note="the first row of a set also pays its backends' one-time start-up (a (1, 64) prefill ran before both)", results=rows)
    if os.environ.get("OUT"):
        name = "prefill_shapes.json" if warm == (128, 256) else f"prefill_shapes_warm_{args.warm.replace(',', '_')}.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
