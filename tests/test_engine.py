"""Our engine against Hugging Face generate on CPU in float32: same greedy tokens, ragged batches included."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, ragged_prompts, tiny_model
from mistral_t4.cache import CacheFullError, StaticKVCache, write_decode
from mistral_t4.engine import Engine
from mistral_t4.model import FastMistral
from mistral_t4.requests import Request, RequestError
from mistral_t4.sampling import SamplingParams
from mistral_t4.worker import Worker


def run_engine(engine: Engine, prompts, new_tokens, **request_kwargs) -> list[list[int]]:
    """Admit everything that fits, step until all finish; returns tokens per prompt in order."""
    seqs = [engine.prepare(Request(prompt=p, max_new_tokens=new_tokens, **request_kwargs))
            for p in prompts]
    pending = list(seqs)
    while pending or engine.active:
        free = engine.free_slots()
        if pending and free:
            batch, pending = pending[:free], pending[free:]
            _, failed = engine.admit(batch)
            assert not failed, failed
        engine.step()
    return [seq.tokens for seq in seqs]


@pytest.fixture(scope="module")
def tokenizer():
    from mistral_t4.models import mistral_tokenizer

    return mistral_tokenizer()


def test_greedy_matches_hf_generate_on_ragged_batch(tokenizer):
    hf = tiny_model(seed=1)
    prompts = ragged_prompts(9, hf.config.vocab_size, seed=2)
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=9, max_len=64, compile=False)
    assert run_engine(engine, prompts, 12) == expected


def test_decode_step_with_our_kernels_choice_matches_hf(tokenizer):
    """The decode step as it runs on sm80+ (rotary + cache write + attention in one op, the residual
    add + RMSNorm as `add_rms_norm_fused`, gate/up with its SwiGLU op), here on CPU where those ops
    run their references: greedy tokens still equal HF generate on a ragged batch."""
    hf = tiny_model(seed=1)
    prompts = ragged_prompts(5, hf.config.vocab_size, seed=3)
    expected = [hf_greedy(hf, p, 10) for p in prompts]
    fast = FastMistral.from_hf(hf, {"nf4_linear": "reference", "decode_attention": "triton"})
    assert fast.fused_norms
    engine = Engine(fast, tokenizer, max_batch=5, max_len=64, compile=False)
    assert run_engine(engine, prompts, 10) == expected


def test_slot_refill_gives_same_tokens_as_alone(tokenizer):
    hf = tiny_model(seed=3)
    prompts = ragged_prompts(20, hf.config.vocab_size, seed=4)
    expected = [hf_greedy(hf, p, 6 + i % 5) for i, p in enumerate(prompts)]
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=4, max_len=64, compile=False)
    with Worker(engine) as worker:
        futures = [worker.submit(p, max_new_tokens=6 + i % 5) for i, p in enumerate(prompts)]
        got = [f.result(timeout=120).tokens for f in futures]
    assert got == expected
    assert engine.free_slots() == 4


def test_sliding_window_matches_hf(tokenizer):
    hf = tiny_model(seed=5, sliding_window=8)
    hf.config._attn_implementation = "eager"  # HF applies the window mask in its eager path
    prompts = ragged_prompts(3, hf.config.vocab_size, seed=6, low=10, high=20)
    expected = [hf_greedy(hf, p, 10) for p in prompts]
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=3, max_len=64, compile=False)
    assert run_engine(engine, prompts, 10) == expected


def test_prefill_logits_match_hf_forward(tokenizer):
    hf = tiny_model(seed=7)
    fast = FastMistral.from_hf(hf)
    engine = Engine(fast, tokenizer, max_batch=2, max_len=64, compile=False)
    prompts = ragged_prompts(2, hf.config.vocab_size, seed=8)
    tokens = torch.zeros(2, 48, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    got = fast.prefill(tokens, lengths, torch.tensor([0, 1]), torch.tensor([-1, -1]))
    for i, p in enumerate(prompts):
        ref = hf(torch.tensor([p])).logits[0, -1].float()
        assert torch.allclose(got[i], ref, atol=1e-4, rtol=1e-4)
    assert sum(k.abs().sum() for k in engine.cache.k) > 0


def test_prefill_attention_never_takes_cudnn(tokenizer, monkeypatch):
    """Prefill's SDPA runs with cuDNN's backend off (it builds a plan per new shape: seconds on an
    H200), flash / memory-efficient / math on, and gives the same logits as before."""
    hf = tiny_model(seed=7)
    fast = FastMistral.from_hf(hf)
    Engine(fast, tokenizer, max_batch=2, max_len=64, compile=False)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return original(*args, **kwargs)

    tokens = torch.randint(0, hf.config.vocab_size, (2, 16))
    args = (tokens, torch.tensor([16, 9]), torch.tensor([0, 1]), torch.tensor([-1, -1]))
    expected = fast.prefill(*args)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = fast.prefill(*args)
    assert len(seen) == hf.config.num_hidden_layers and set(seen) == {(False, True, True, True)}
    assert torch.equal(got, expected)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # only inside prefill


def test_warm_up_prefills_leave_no_trace(tokenizer):
    """The warm-up's dummy prefills (GPU engines) write only cache rows that real prefills overwrite:
    no slot taken, no decode state, and the greedy tokens afterwards still equal HF's."""
    hf = tiny_model(seed=12)
    prompts = ragged_prompts(3, hf.config.vocab_size, seed=13)
    expected = [hf_greedy(hf, p, 8) for p in prompts]
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=3, max_len=64, compile=False)
    engine._warm_prefill(16)
    assert sum(k[:2].abs().sum() for k in engine.cache.k) > 0  # it did run, into rows 0 and 1
    assert engine.free_slots() == 3 and not engine.active
    assert not engine.tokens.any() and not engine.positions.any() and not engine.running.any()
    assert run_engine(engine, prompts, 8) == expected


def test_warm_up_while_serving_changes_nothing(tokenizer):
    """step() warms up lazily when nobody did (GPU engines), so warm-up may find sequences running:
    it keeps their tokens, positions and cache rows (the warm-up prefills take free slots only)."""
    hf = tiny_model(seed=14)
    prompts = ragged_prompts(2, hf.config.vocab_size, seed=15)
    expected = [hf_greedy(hf, p, 10) for p in prompts]
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=3, max_len=64, compile=False)
    seqs = [engine.prepare(Request(prompt=p, max_new_tokens=10)) for p in prompts]
    engine.admit(seqs)
    for _ in range(4):
        engine.step()
    engine.warmup()
    engine._warm_prefill(16)  # what warm-up runs on a GPU: one free slot left, so only 1 dummy prompt
    while engine.active:
        engine.step()
    assert [seq.tokens for seq in seqs] == expected


@torch.inference_mode()  # as the engine prefills
def _prefill_shapes(fast, ops, shapes):
    for n, length in shapes:
        tokens = torch.randint(0, fast.embed.shape[0], (n, length))
        fast.prefill(tokens, torch.full((n,), length), torch.arange(n), torch.full((n,), -1), ops)


def test_prefill_compiles_nothing_after_warm_up(tokenizer):
    """After warm-up (1 and 2 prompts at two lengths, as the engine does), prefill at other prompt
    counts and lengths reuses the compiled graphs: a recompile there stalled a request for seconds
    on an H200. Warming one length only does recompile: dynamo takes sizes equal at the first
    trace for one symbol (here the length 128 and the fused qkv width 128; on the GPU, the
    bucket 128 and Mistral's head_dim 128), so this test can tell."""
    from mistral_t4 import model as model_module

    hf = tiny_model(seed=11)
    fast = FastMistral.from_hf(hf)
    assert fast.layers[0].qkv.out_features == 128
    Engine(fast, tokenizer, max_batch=8, max_len=320, compile=False)
    new_shapes = [(3, 64), (1, 192), (5, 128), (2, 320), (8, 32)]
    try:
        for warm, recompiles in [((128,), True), ((128, 256), False)]:
            torch._dynamo.reset()
            model_module.fused_ops.cache_clear()
            fused = model_module.fused_ops()
            fast.warm_prefill_ops(fused, warm)
            with torch._dynamo.config.patch(error_on_recompile=True):
                if recompiles:
                    with pytest.raises(torch._dynamo.exc.RecompileError):
                        _prefill_shapes(fast, fused, new_shapes)
                else:
                    _prefill_shapes(fast, fused, new_shapes)
    finally:
        torch._dynamo.reset()
        model_module.fused_ops.cache_clear()


def test_fused_prefill_ops_match_eager(tokenizer):
    """The compiled elementwise steps of prefill (what GPUs run) against the eager ones, on CPU.

    Compiled with dynamic shapes once, then called at another batch and length, and inside a
    whole prefill of ragged prompts, whose logits and cache must match the eager prefill's.
    """
    from mistral_t4.model import EAGER_OPS, fused_ops

    fused = fused_ops()
    hf = tiny_model(seed=9)
    fast = FastMistral.from_hf(hf)
    engine = Engine(fast, tokenizer, max_batch=3, max_len=64, compile=False)
    fast.warm_prefill_ops(fused, 16)
    generator = torch.Generator().manual_seed(10)
    x, delta = torch.randn(2, 3, 24, 64, generator=generator)  # other batch and length than the warm-up
    weight = torch.randn(64, generator=generator)
    for got, ref in [
        (fused.rms_norm(x, weight, 1e-5), EAGER_OPS.rms_norm(x, weight, 1e-5)),
        (fused.add_rms_norm(x, delta, weight, 1e-5), EAGER_OPS.add_rms_norm(x, delta, weight, 1e-5)),
        (fused.silu_mul(x), EAGER_OPS.silu_mul(x)),
        (fused.rotate_qk(x, delta, weight[:64], weight.flip(0)), EAGER_OPS.rotate_qk(x, delta, weight, weight.flip(0))),
    ]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    prompts = ragged_prompts(3, hf.config.vocab_size, seed=11)
    tokens = torch.zeros(3, 48, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    args = (tokens, torch.tensor([len(p) for p in prompts]), torch.tensor([0, 1, 2]), torch.tensor([-1, -1, -1]))
    eager_logits = fast.prefill(*args)
    eager_cache = [k.clone() for k in engine.cache.k]
    torch.testing.assert_close(fast.prefill(*args, ops=fused), eager_logits, rtol=1e-4, atol=1e-4)
    for k, ref in zip(engine.cache.k, eager_cache):
        torch.testing.assert_close(k, ref, rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tokenizer):
    hf = tiny_model(seed=9)
    prompts = ragged_prompts(4, hf.config.vocab_size, seed=10)
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=4, max_len=64, compile=False)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    first = run_engine(engine, prompts, 10, sampling=sampled)
    again = run_engine(engine, prompts, 10, sampling=sampled)
    other = run_engine(engine, prompts, 10, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=124))
    assert first == again
    assert first != other
    greedy = run_engine(engine, prompts, 10)
    top1 = run_engine(engine, prompts, 10, sampling=SamplingParams(temperature=0.7, top_k=1, seed=5))
    assert top1 == greedy
    assert first != greedy  # temperature 1 over a spread distribution does leave the argmax path


def test_request_longer_than_cache_is_refused(tokenizer):
    hf = tiny_model(seed=11)
    engine = Engine(FastMistral.from_hf(hf), tokenizer, max_batch=2, max_len=128, compile=False)
    with pytest.raises(RequestError, match="exceeds the cache length 128"):
        engine.prepare(Request(prompt=list(range(3, 103)), max_new_tokens=40))
    engine.prepare(Request(prompt=list(range(3, 103)), max_new_tokens=28))  # exactly fits


def test_cache_writes_land_at_their_positions():
    config = tiny_model().config
    cache = StaticKVCache(config, max_batch=3, max_len=10, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.max_len == 128  # rounded up to a multiple of 128
    k = torch.randn(2, 2, 5, 16)
    cache.write_prefill(1, torch.tensor([2, 0]), k, -k)
    assert torch.equal(cache.k[1][2, :, :5], k[0]) and torch.equal(cache.k[1][0, :, :5], k[1])
    assert torch.equal(cache.v[1][2, :, :5], -k[0])
    assert cache.k[0].abs().sum() == 0 and cache.k[1][1].abs().sum() == 0
    new = torch.randn(3, 2, 16)
    write_decode(cache.k[0], cache.v[0], torch.tensor([7, 0, 3]), new, new * 2)
    assert torch.equal(cache.k[0][0, :, 7], new[0]) and torch.equal(cache.k[0][2, :, 3], new[2])
    assert torch.equal(cache.v[0][1, :, 0], new[1] * 2)
    written = (cache.k[0].abs().sum(-1) > 0).nonzero().tolist()
    assert sorted(written) == sorted([[0, h, 7] for h in range(2)] + [[1, h, 0] for h in range(2)]
                                     + [[2, h, 3] for h in range(2)])
    with pytest.raises(CacheFullError):
        cache.check_fits(100, 29)


def test_cache_refuses_what_does_not_fit_in_memory(monkeypatch):
    from mistral_t4 import devices

    config = tiny_model().config
    monkeypatch.setattr(devices, "memory_budget_bytes", lambda device, cap=None: 1000)
    with pytest.raises(MemoryError, match=r"needs .* GiB, only .* GiB is free"):
        StaticKVCache(config, max_batch=4, max_len=256, dtype=torch.float32, device=torch.device("cpu"))


def make_adapter(hf, path, seed: int, targets=("q_proj", "v_proj", "down_proj")):
    """A small random LoRA adapter saved with peft (B is not zero, so it changes the output)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(hf, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.3)
    peft_model.save_pretrained(path)
    return peft_model.unload()


def test_lora_adapters_match_peft_per_row(tokenizer, tmp_path):
    from mistral_t4.loading import attach_adapters

    base = tiny_model(seed=12)
    plain_prompts = ragged_prompts(6, base.config.vocab_size, seed=13)
    plain = [hf_greedy(base, p, 8) for p in plain_prompts]
    make_adapter(tiny_model(seed=12), tmp_path / "a", seed=1)
    make_adapter(tiny_model(seed=12), tmp_path / "b", seed=2, targets=("k_proj", "gate_proj", "o_proj"))
    model = attach_adapters(tiny_model(seed=12), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = [hf_greedy(model, p, 8) for p in plain_prompts]
    assert expected["a"] != plain and expected["b"] != plain and expected["a"] != expected["b"]
    engine = Engine(FastMistral.from_hf(model), tokenizer, max_batch=6, max_len=64, compile=False)
    assert engine.adapters == ["a", "b"]
    # one batch, rows on adapter a, adapter b and none, interleaved
    choice = ["a", "b", None, "b", None, "a"]
    tokens = run_engine_mixed(engine, plain_prompts, 8, choice)
    for i, c in enumerate(choice):
        assert tokens[i] == (plain[i] if c is None else expected[c][i]), (i, c)


@pytest.mark.parametrize("norms_in_matmuls", [False, True])
def test_compiled_decode_compiles_one_layer_for_all(tokenizer, tmp_path, norms_in_matmuls):
    """The engine's compiled decode step (inductor, here on CPU): the step's start, one decoder layer and its end
    are compiled, and every layer reuses the layer's graph (a recompile per layer would cost ~30x the compile on a GPU);
    greedy tokens equal HF's / peft's on a ragged batch with an adapter on some rows; also with the norms carried
    by the projections (the layer's state a pair there)."""
    from torch._dynamo.utils import counters

    from mistral_t4.loading import attach_adapters

    base = tiny_model(seed=16, num_hidden_layers=3)
    prompts = ragged_prompts(4, base.config.vocab_size, seed=17)
    plain = [hf_greedy(base, p, 6) for p in prompts]
    make_adapter(tiny_model(seed=16, num_hidden_layers=3), tmp_path / "a", seed=3)
    model = attach_adapters(tiny_model(seed=16, num_hidden_layers=3), {"a": str(tmp_path / "a")})
    with_adapter = [hf_greedy(model, p, 6) for p in prompts]
    assert with_adapter != plain
    torch._dynamo.reset()
    counters.clear()
    try:
        fast = FastMistral.from_hf(model)
        fast.norms_in_matmuls = norms_in_matmuls
        engine = Engine(fast, tokenizer, max_batch=4, max_len=64, compile=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            tokens = run_engine_mixed(engine, prompts, 6, ["a", None, "a", None])
        assert counters["stats"]["unique_graphs"] == 3  # decode_start, decode_layer, decode_end
    finally:
        torch._dynamo.reset()
    assert tokens == [with_adapter[0], plain[1], with_adapter[2], plain[3]]


def test_decode_step_with_norms_in_matmuls_matches_hf(tokenizer, tmp_path):
    """The decode step with its RMSNorms carried by the projections (`FastMistral.norms_in_matmuls`: o and down
    keep the residual sum, its product with the next norm's weight and its sums of squares; qkv and gate/up scale
    their rows; here on CPU, the steps in PyTorch), adapters on some rows: greedy tokens equal HF's / peft's on
    a ragged batch."""
    from mistral_t4.loading import attach_adapters

    base = tiny_model(seed=21)
    prompts = ragged_prompts(5, base.config.vocab_size, seed=22)
    plain = [hf_greedy(base, p, 8) for p in prompts]
    make_adapter(tiny_model(seed=21), tmp_path / "a", seed=4, targets=("q_proj", "o_proj", "gate_proj", "down_proj"))
    model = attach_adapters(tiny_model(seed=21), {"a": str(tmp_path / "a")})
    with_adapter = [hf_greedy(model, p, 8) for p in prompts]
    assert with_adapter != plain
    fast = FastMistral.from_hf(model, {"nf4_linear": "reference", "decode_attention": "triton"})
    assert not fast.norms_in_matmuls  # only the CUDA NF4 backend's kernels carry them
    fast.norms_in_matmuls = True
    engine = Engine(fast, tokenizer, max_batch=5, max_len=64, compile=False)
    choice = ["a", None, "a", None, None]
    tokens = run_engine_mixed(engine, prompts, 8, choice)
    assert tokens == [with_adapter[i] if c else plain[i] for i, c in enumerate(choice)]


def test_nf4_cuda_choice_on_cpu_matches_hf(tiny_random_path, tokenizer, monkeypatch):
    """NF4 weights in the CUDA kernels' layout with their decode step (norms in the matmuls: the ops' CPU path
    here) give HF's greedy tokens. Steps of up to 16 rows fold their norms (the kernels with those epilogues),
    none with MISTRAL_T4_NORMS_IN_MATMULS=0."""
    from mistral_t4 import kernels, loading

    model, _ = loading.load(str(tiny_random_path), quant="nf4", device="cpu")
    prompts = ragged_prompts(4, model.config.vocab_size, seed=23)
    expected = [hf_greedy(model, p, 8) for p in prompts]
    choice = {"nf4_linear": "cuda", "decode_attention": "triton"}
    fast = FastMistral.from_hf(model, choice)
    assert fast.norms_in_matmuls and fast.layers[0].qkv.nf4.backend == "cuda"
    assert fast.folds_norms(1) and fast.folds_norms(16) and not fast.folds_norms(17)
    engine = Engine(fast, tokenizer, max_batch=4, max_len=64, compile=False)
    assert engine.describe()["norms_in_matmuls"] and "epilogues" in engine.kernels_line()
    assert run_engine(engine, prompts, 8) == expected
    assert not FastMistral.from_hf(model).folds_norms(1)  # the references: never
    monkeypatch.setenv(kernels.NORMS_IN_MATMULS_ENV, "0")
    assert not fast.folds_norms(1) and not engine.describe()["norms_in_matmuls"]


def test_compiled_decode_of_nf4_weights_compiles_one_layer(model_cache, monkeypatch):
    """The same with NF4 weights (bitsandbytes on CPU, our NF4 reference): each layer's weights sit in an
    `NF4Weight` object; dynamo must guard on its tensors and settings, not on the object, or every layer
    would recompile (and past 8, run uncompiled)."""
    from torch._dynamo.utils import counters

    from mistral_t4 import loading
    from mistral_t4.engine import make_engine

    monkeypatch.setenv("MISTRAL_T4_CACHE", str(model_cache))
    model, tokenizer = loading.load("tiny-random", quant="nf4", device="cpu")
    prompts = [tokenizer(t)["input_ids"] for t in ["Hello there", "The quick brown fox", "2 + 2 ="]]
    expected = [hf_greedy(model, p, 5) for p in prompts]
    torch._dynamo.reset()
    counters.clear()
    try:
        engine = make_engine("mistral_t4", model, tokenizer, max_batch=3, max_len=64, compile=True)
        assert engine.model.layers[0].qkv.nf4 is not None and len(engine.model.layers) == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert run_engine(engine, prompts, 5) == expected
        assert counters["stats"]["unique_graphs"] == 3
    finally:
        torch._dynamo.reset()


def run_engine_mixed(engine: Engine, prompts, new_tokens, adapters) -> list[list[int]]:
    """All prompts in one batch, each on its adapter (or none); tokens per prompt."""
    seqs = [engine.prepare(Request(prompt=p, max_new_tokens=new_tokens, adapter=a)) for p, a in zip(prompts, adapters)]
    engine.admit(seqs)
    while engine.active:
        engine.step()
    return [seq.tokens for seq in seqs]


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
@pytest.mark.parametrize("spec", ["tiny-random", "smollm2-mistral"])
def test_greedy_matches_hf_on_builtin_models(spec, quant, model_cache, monkeypatch):
    """The checkpoints as loaded by `loading.load` (NF4 through bitsandbytes on CPU): same tokens as HF."""
    from mistral_t4 import loading
    from mistral_t4.engine import make_engine

    monkeypatch.setenv("MISTRAL_T4_CACHE", str(model_cache))
    model, tokenizer = loading.load(spec, quant=quant, device="cpu")
    texts = ["What is the capital of France?", "Tell me a story about a dragon", "2 + 2 =", "Hi",
             "List three colours:", "The quick brown fox jumps over the lazy dog because",
             "Explain photosynthesis to a child in one sentence.", "Bonjour, comment"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) >= 6  # ragged
    expected = [hf_greedy(model, p, 10) for p in prompts]
    engine = make_engine("mistral_t4", model, tokenizer, max_batch=8, max_len=128, compile=False)
    assert run_engine(engine, prompts, 10) == expected


def test_eos_stop_strings_and_streaming_on_a_real_model(model_cache, monkeypatch):
    """smollm2 answers, then ends with EOS; a stop string cuts the text; streamed pieces add up to the text."""
    from mistral_t4 import loading
    from mistral_t4.engine import make_engine

    monkeypatch.setenv("MISTRAL_T4_CACHE", str(model_cache))
    model, tokenizer = loading.load("smollm2-mistral", quant="fp32", device="cpu")
    engine = make_engine("mistral_t4", model, tokenizer, max_batch=2, max_len=128, compile=False)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    pieces = []
    with Worker(engine) as worker:
        full = worker.submit(question, max_new_tokens=40, on_token=lambda token, text: pieces.append(text)).result()
        cut = worker.submit(question, max_new_tokens=40, stop=["Paris"]).result()
    assert full.finish_reason == "eos" and full.tokens[-1] == tokenizer.eos_token_id
    assert "Paris" in full.text and "<|im_end|>" not in full.text
    assert "".join(pieces).strip() == full.text.strip()
    assert cut.finish_reason == "stop"
    assert "Paris" not in cut.text and full.text.startswith(cut.text)
    assert len(cut.tokens) < len(full.tokens)
