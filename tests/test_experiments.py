"""CPU checks of the GPU experiments in bench/experiments (their kernels run only on a GPU)."""

import importlib.util
from pathlib import Path

import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "bench" / "experiments"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_fragment_layout():
    """Byte j of word t of lane 4g + c in block b of row group G holds the weights the kernel's
    mma.sync A registers need: rows g + 8 * (j % 2), K offset 64 b + 16 c + 4 t + 2 (j // 2),
    first weight in the low nibble; scales pair rows g and g + 8 (fp16); padding rows are 0."""
    cuda = load("nf4_cuda")
    n, k = 40, 192  # 3 row groups (the last padded), 3 blocks
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(n, k // 64, generator=generator)
    packed, scales = cuda.repack(q, absmax, n)
    groups, blocks = 3, 3
    assert packed.numel() == groups * blocks * 512 and scales.shape == (groups, blocks, 8)
    frag = packed.view(groups, blocks, 8, 4, 4, 4)  # (G, b, g, c, t, j)
    pairs = scales.view(torch.float16).view(groups, blocks, 8, 2)
    padded_q = torch.cat([q, q.new_full((8, k), 7)])
    padded_absmax = torch.cat([absmax, absmax.new_zeros(8, k // 64)]).half()
    for G in range(groups):
        for b in range(blocks):
            for g in range(8):
                for rh in range(2):
                    assert pairs[G, b, g, rh] == padded_absmax[16 * G + g + 8 * rh, b]
                for c in range(4):
                    for t in range(4):
                        for j in range(4):
                            row, col = 16 * G + g + 8 * (j % 2), 64 * b + 16 * c + 4 * t + 2 * (j // 2)
                            want = int(padded_q[row, col]) | int(padded_q[row, col + 1]) << 4
                            assert int(frag[G, b, g, c, t, j]) == want, (G, b, g, c, t, j)
    # and bitsandbytes' byte order (first weight in the high nibble) reads back as indices
    bnb_order = (q[:, 0::2] << 4) | q[:, 1::2]
    assert torch.equal(cuda.indices_from_bnb_order(bnb_order, n, k), q)
