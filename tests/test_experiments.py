"""CPU checks of the GPU experiments in bench/experiments (their kernels run only on a GPU)."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "bench" / "experiments"


def compiled(source, arch, tmp_path):
    """(resource usage, SASS) of `source` compiled by NVRTC for `arch`, read back by Triton's cuobjdump."""
    from mistral_t4.kernels import nf4_cuda

    if nf4_cuda.nvrtc_library() is None:
        pytest.skip("NVRTC is not installed (scripts/setup.sh test installs it)")
    triton = pytest.importorskip("triton")
    cubin = tmp_path / "kernels.cubin"
    cubin.write_bytes(nf4_cuda._nvrtc_compile(source, arch)[0])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    return usage, sass


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


def test_wgmma_natural_fragments():
    """bench/experiments/nf4_wgmma.py's weight order: byte 2h + rh of word t of lane 4g + c in block b of
    row group G holds rows 16G + g + 8rh at k = 64b + 16t + 8h + 2c (low nibble) and k + 1 (high nibble)."""
    wgmma = load("nf4_wgmma")
    n, k = 32, 192
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)

    class Weight:  # what natural_fragments reads of an NF4Weight
        def bnb_packed(self):
            return (q[:, 0::2] << 4) | q[:, 1::2]

    frag = wgmma.natural_fragments(Weight()).view(2, 3, 8, 4, 4, 4)  # (G, b, g, c, t, byte)
    G, b, g, c, t, j = torch.meshgrid(*[torch.arange(s) for s in frag.shape], indexing="ij")
    rows = 16 * G + g + 8 * (j % 2)
    cols = 64 * b + 16 * t + 8 * (j // 2) + 2 * c
    assert torch.equal(frag, q[rows, cols] | (q[rows, cols + 1] << 4))


def test_wgmma_experiment_compiles(tmp_path):
    """Its CUDA source compiles for sm_90a (NVRTC, no GPU) with no local memory, and uses wgmma (HGMMA)."""
    from mistral_t4.kernels import nf4_cuda

    if nf4_cuda.nvrtc_library() is None:
        pytest.skip("NVRTC is not installed (scripts/setup.sh test installs it)")
    triton = pytest.importorskip("triton")
    wgmma = load("nf4_wgmma")
    variants = [(4, 2, 4, 2, 0), (8, 2, 4, 2, 2)]
    cubin = tmp_path / "wgmma.cubin"
    cubin.write_bytes(nf4_cuda._nvrtc_compile(wgmma.source(variants), "sm_90a")[0])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    assert all(wgmma.name(*v) in usage for v in variants) and usage.count("LOCAL:0") == len(variants), usage
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    assert "HGMMA.64x32x16.F32" in sass and "HGMMA.64x64x16.F32" in sass and "LDGSTS" in sass


def test_wide_experiment_compiles(tmp_path):
    """bench/experiments/nf4_wide.py instantiates the package kernel's template for each variant:
    all compile for sm_90 (NVRTC, no GPU) with no local memory, each with its MMAs."""
    wide = load("nf4_wide")
    usage, sass = compiled(wide.source(), "sm_90", tmp_path)
    names = [wide.name(v) for v in wide.VARIANTS]
    assert all(name in usage for name in names) and usage.count("LOCAL:0") == usage.count("Function "), usage
    assert sass.count("HMMA.16816.F32") >= 4 * len(names)
    assert all(wide.column_tiles(m) == nt for m, nt in [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4)])


def test_wide_experiment_scale_a_variants(tmp_path):
    """A fifth value 1 in a variant of nf4_wide.py / nf4_ranges.py --variants instantiates the package's
    `scale_a` kernel (looked-up weights times their absmax in fp16 before the MMAs): HMUL2 there only."""
    wide = load("nf4_wide")
    variants = [(4, 2, 4, 12), (4, 2, 4, 12, 1)]
    _, sass = compiled(wide.source(variants), "sm_90", tmp_path)
    functions = {f.split("\n", 1)[0].strip(): f for f in sass.split("Function : ")[1:]}
    assert ["HMUL2" in functions[wide.name(v)] for v in variants] == [False, True]


def test_mma_rate_experiment_compiles(tmp_path):
    """bench/experiments/mma_rate.py's kernels compile for sm_90: the MMAs with fp32 and fp16 accumulators,
    and the table lookup as the package does it (one PRMT per shared-memory load)."""
    rate = load("mma_rate")
    _, sass = compiled(rate.SOURCE, "sm_90", tmp_path)
    functions = {f.split("\n", 1)[0].strip(): f for f in sass.split("Function : ")[1:]}
    assert "HMMA.16816.F32" in functions["mma_f32_8"] and "HMMA.16816.F16" in functions["mma_f16_8"]
    assert functions["lookup"].count("PRMT") >= 16 and functions["lookup"].count("LDS") >= 16


def test_stream_experiment_compiles(tmp_path):
    """bench/experiments/nf4_stream.py's kernels (the package kernel's loads with its arithmetic
    taken out) compile for sm_90 beside the package's; only the table variant reads shared memory."""
    stream = load("nf4_stream")
    from mistral_t4.kernels import nf4_cuda

    usage, sass = compiled(nf4_cuda.SOURCE + stream.STREAM, "sm_90", tmp_path)
    kernels = {kernel for _, kernel, _ in stream.VARIANTS}
    assert kernels == {"stream_loads", "stream_loads_d8", "stream_loads_2cta", "stream_table", "stream_loads_bmajor",
                       "stream_table_bmajor"}
    functions = {f.split("\n", 1)[0].strip(): f for f in sass.split("Function : ")[1:]}
    for kernel in kernels:
        assert "LDG.E.128" in functions[kernel], kernel  # the ring's 16-byte weight loads
        assert ("LDS" in functions[kernel]) == kernel.startswith("stream_table") and "HMMA" not in functions[kernel]


def test_ranges_experiment_compiles(tmp_path):
    """bench/experiments/nf4_ranges.py's variants (1 to 32 rows, K ranges) compile for sm_90 with
    no local memory, the first is the package's 8-row kernel, and its sweep only proposes
    geometries the kernel's warps can hold."""
    ranges = load("nf4_ranges")
    wide = load("nf4_wide")
    from mistral_t4.kernels import nf4_cuda

    first = nf4_cuda.KERNELS[0]
    assert ranges.V[0] == (first.tiles, first.groups, first.ring, first.warps) and first.rows == 8
    usage, _ = compiled(wide.source(ranges.V), "sm_90", tmp_path)
    assert all(wide.name(v) in usage for v in ranges.V) and usage.count("LOCAL:0") == usage.count("Function "), usage
    for v in ranges.V:
        _, ng, _, warps = v
        for tile, split, slices in ranges.configs(v, 384, 64, 132):
            assert tile <= warps * ng and -(-tile // ng) * slices <= warps and 64 // split // slices >= 2


def test_bulk_experiment_compiles(tmp_path):
    """bench/experiments/nf4_bulk.py (the package kernel with a TMA-filled weight ring) compiles for
    sm_90a with no local memory, issues bulk copies (UBLKCP) and waits on mbarriers, and its shared
    memory fits the 227 KB a block may have where the window starts at 1 KB."""
    bulk = load("nf4_bulk")
    usage, sass = compiled(bulk.source(), "sm_90a", tmp_path)
    assert all(f"Function {bulk.name(v)}:" in usage for v in bulk.VARIANTS), usage
    assert usage.count("LOCAL:0") == usage.count("Function "), usage
    assert "UBLKCP" in sass and "SYNCS.PHASECHK" in sass
    assert all(bulk.shared_bytes(v, 1024) <= 227 * 1024 for v in bulk.VARIANTS)


def test_interleave_experiment_addresses():
    """bench/experiments/nf4_interleave.py: its (G / 2, b, G % 2) copy of the fragment layout puts group G's
    block b where its kernel reads it ((G / 2) * nb * 2 + b * 2 + G % 2, in 512- and 64-byte units), and its
    source substitutes every weight and scale address of the package's template."""
    interleave = load("nf4_interleave")
    groups, nb = 6, 3
    packed = torch.randint(0, 256, (groups * 16, nb * 32), dtype=torch.uint8)
    scales = torch.rand(groups * 16, nb)
    w, s = interleave.interleave(packed, scales, 2)
    for G in range(groups):
        for b in range(nb):
            at = (G // 2) * nb * 2 + b * 2 + G % 2
            assert torch.equal(w.view(-1, 512)[at], packed.view(-1, 512)[G * nb + b])
            assert torch.equal(s.view(-1, 16)[at], scales.view(-1, 16)[G * nb + b])
    assert "nf4_interleaved_body<1," in interleave.source()


def test_step_profile_groups_kernels():
    """bench/step_profile.py puts each kernel of a decode step in its group by name: inductor's fused
    kernels by their prefix even when named after the NF4 op they feed, our matmuls and attention by theirs."""
    spec = importlib.util.spec_from_file_location("step_profile", EXPERIMENTS.parent / "step_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    groups = {name: profile.group_of(name) for name in [
        "nf4_matmul32w", "_nf4_matmul_kernel", "kgemm_4bit_inference_naive<half, 128, 16>",
        "triton_red_fused__to_copy_add_mean_mul_nf4_linear_fragments_pow_rsqrt_11",
        "triton_poi_fused__to_copy_add_decode_attention_3", "_decode_attention_kernel", "_combine_splits_kernel",
        "nvjet_sm90_hsh_256x8_64x6_2x1_v_bz_TNT", "void at::native::vectorized_elementwise_kernel<4>",
        "nf4_matmul32w_swiglu", "_add_rms_norm_kernel"]}
    assert list(groups.values()) == ["nf4_matmul"] * 3 + ["fused_elementwise"] * 2 + ["decode_attention"] * 2 + [
        "dense_gemm", "other", "nf4_matmul", "add_rms_norm"]


def test_step_profile_advances():
    """bench/step_profile.py credits each kernel with the time by which it moved the end of the GPU's work:
    a kernel under a longer one (launched early, overlapping it) gets nothing, idle time nobody, and the
    credits add up to the busy time."""
    spec = importlib.util.spec_from_file_location("step_profile", EXPERIMENTS.parent / "step_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    spans = [(0.0, 10.0, "a"), (5.0, 12.0, "b"), (6.0, 8.0, "c"), (15.0, 20.0, "a"), (16.0, 21.0, "b")]
    assert dict(profile.advances(spans)) == {"a": 15.0, "b": 3.0, "c": 0.0}
    assert dict(profile.advances(list(reversed(spans)))) == {"a": 15.0, "b": 3.0, "c": 0.0}


def test_timeline_experiment_compiles(tmp_path):
    """bench/experiments/nf4_timeline.py: the package's kernels with timestamps at the template's phase
    boundaries compile for sm_90 (its string substitutions still find their places), with and without
    the table built from constants."""
    timeline = load("nf4_timeline")
    from mistral_t4.kernels import nf4_cuda

    for constant in (False, True):
        usage, sass = compiled(timeline.source(constant), "sm_90", tmp_path)
        names = [f"timed_{k.name}_0" for k in nf4_cuda.KERNELS] + [f"timed_{k.name}_swiglu_3" for k in nf4_cuda.KERNELS if k.swiglu]
        assert all(name in usage for name in names), usage
        assert "GLOBALTIMER" in sass or "globaltimer" in sass.lower()


def test_step_launch_patches_only_what_it_names():
    """bench/experiments/step_launch.py: a plan override applies to its weight shape alone (the rule's plan for
    any other), and the attention override keeps the caller's splits unless it names its own."""
    from mistral_t4.kernels import attention_triton, nf4_cuda

    experiment = load("step_launch")
    plan = experiment.patched_plan(6144, 4096, 3, 1, 8)
    for rows in (1, 32):
        kernel, *rule = nf4_cuda.launch_plan(rows, 6144, 4096, 132)
        assert plan(rows, 6144, 4096, 132) == (kernel, 3, 1, 8) and rule != [3, 1, 8]
        assert plan(rows, 4096, 4096, 132) == nf4_cuda.launch_plan(rows, 4096, 4096, 132)
    seen = []
    package = attention_triton._launch
    attention_triton._launch = lambda *args, **tiles: seen.append((args[12], tiles))
    try:
        experiment.patched_attention(32, 8, 3, None)(*range(12), 4)
        experiment.patched_attention(32, 8, 3, 1)(*range(12), 4)
    finally:
        attention_triton._launch = package
    assert seen == [(4, dict(block_len=32, num_warps=8, num_stages=3)), (1, dict(block_len=32, num_warps=8, num_stages=3))]
