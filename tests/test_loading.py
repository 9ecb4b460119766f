"""Loading in NF4 / fp32 on CPU, LoRA adapters through peft, memory estimates."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_model
from mistral_t4 import loading


def test_nf4_load_on_cpu_quantizes_every_projection(tiny_random_path):
    import bitsandbytes as bnb

    model, tokenizer = loading.load(str(tiny_random_path), quant="nf4", device="cpu")
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert all(m.weight.quant_state.nested for m in linear4)  # double quantization
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    assert linear4[0].compute_dtype == torch.float32  # CPU computes in fp32
    fp32, _ = loading.load(str(tiny_random_path), quant="fp32", device="cpu")
    ids = tokenizer("Hello there, how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, fp32(ids).logits
    assert torch.isfinite(a).all()
    rel = (a - b).norm() / b.norm()
    assert 0 < rel < 0.2, rel  # quantized, so not equal, but close
    linear_fp32 = sum(m.weight.nbytes for m in fp32.modules()
                      if isinstance(m, torch.nn.Linear) and m is not fp32.lm_head)
    saved = loading.footprint_bytes(fp32) - loading.footprint_bytes(model)
    assert saved > 0.8 * linear_fp32, (saved, linear_fp32)  # 4 bits + scales instead of 32 bits


def test_footprint_counts_nf4_scales(tiny_random_path):
    """The footprint (and so the benchmark's floor) counts the NF4 weights' double-quantized scales, which
    bitsandbytes keeps outside the parameters: one uint8 absmax per 64 weights, an fp32 one per 256 blocks."""
    import bitsandbytes as bnb

    model, _ = loading.load(str(tiny_random_path), quant="nf4", device="cpu")
    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    scales = loading.footprint_bytes(model) - model.get_memory_footprint()
    absmax = sum(w.quant_state.absmax.numel() for w in weights)
    assert absmax == sum(w.quant_state.shape.numel() // 64 for w in weights)
    assert all(w.quant_state.absmax.dtype == torch.uint8 for w in weights)
    nested = sum(w.quant_state.state2.absmax.nbytes + w.quant_state.state2.code.nbytes + w.quant_state.code.nbytes
                 for w in weights)
    assert scales == absmax + nested


def test_weight_estimate_matches_loaded_footprint(tiny_random_path):
    for quant in ("fp32", "nf4"):
        model, _ = loading.load(str(tiny_random_path), quant=quant, device="cpu")
        estimate = loading.estimate_weight_bytes(model.config, quant, torch.float32)
        actual = loading.footprint_bytes(model)
        assert abs(estimate - actual) / actual < 0.05, (quant, estimate, actual)


def test_7b_estimates_fit_a_t4():
    from mistral_t4.models import mistral_7b_config

    config = mistral_7b_config()
    nf4 = loading.estimate_weight_bytes(config, "nf4") / 2**30
    fp16 = loading.estimate_weight_bytes(config, "fp16") / 2**30
    assert 3.6 < nf4 < 4.2 and 13.2 < fp16 < 13.8, (nf4, fp16)


def test_random_model_has_requested_shape_and_quant():
    import bitsandbytes as bnb

    from helpers import tiny_config

    config = tiny_config()
    model = loading.random_model(config, "fp32", torch.float32, torch.device("cpu"), seed=3)
    again = loading.random_model(config, "fp32", torch.float32, torch.device("cpu"), seed=3)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, again.model.layers[1].mlp.down_proj.weight)
    assert not any(p.is_meta for p in model.parameters())
    ids = torch.tensor([[1, 5, 9]])
    assert torch.isfinite(model(ids).logits).all()
    quantized = loading.random_model(config, "nf4", torch.float32, torch.device("cpu"), seed=3)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(quantized.lm_head, bnb.nn.Linear4bit)  # lm_head stays dense, as from_pretrained does
    assert torch.isfinite(quantized(ids).logits).all()


def test_lora_adapter_changes_output_and_matches_peft(tmp_path, tiny_random_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import MistralForCausalLM

    base = MistralForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    model, tokenizer = loading.load(str(tiny_random_path), quant="fp32", device="cpu",
                                    lora=[f"mine={tmp_path / 'adapter'}"])
    assert list(model.peft_config) == ["mine"]
    plain, _ = loading.load(str(tiny_random_path), quant="fp32", device="cpu")
    reference = PeftModel.from_pretrained(
        MistralForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32), tmp_path / "adapter")
    ids = tokenizer("The adapter should matter.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, base_out, ref = model(ids).logits, plain(ids).logits, reference(ids).logits
    assert not torch.allclose(ours, base_out, atol=1e-3)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_adapter_errors_are_clear(tmp_path, tiny_random_path):
    model = tiny_model()
    with pytest.raises(loading.LoadError, match="is not a directory"):
        loading.attach_adapters(model, str(tmp_path / "missing"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(loading.LoadError, match="pickle"):
        loading.attach_adapters(model, str(tmp_path / "pickled"))
    with pytest.raises(loading.LoadError, match="given twice"):
        loading.parse_lora(["a=x", "a=y"])
    assert loading.parse_lora(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    assert loading.parse_lora("/some/dir") == {"default": "/some/dir"}


def test_bad_quant_and_fp16_on_cpu_are_refused(tiny_random_path):
    with pytest.raises(loading.LoadError, match="quant must be one of"):
        loading.load(str(tiny_random_path), quant="int3", device="cpu")
    with pytest.raises(loading.LoadError, match="fp16 needs a GPU"):
        loading.load(str(tiny_random_path), quant="fp16", device="cpu")


def test_memory_check_refuses_with_numbers(monkeypatch):
    from mistral_t4 import devices

    monkeypatch.setattr(devices, "memory_budget_bytes", lambda device, cap=None: 2 * 2**30)
    with pytest.raises(MemoryError, match=r"needs 13\.\d\d GiB but only 2\.00 GiB"):
        loading.check_fits(int(13.5 * 2**30), torch.device("cpu"), None, "random-7b in fp16")


def test_system_description_records_kernel_settings(monkeypatch):
    """Benchmark JSON carries the MISTRAL_T4_* switches of the run (which kernels ran), not the cache path."""
    from mistral_t4 import devices

    monkeypatch.setenv("MISTRAL_T4_NF4_CUDA_ROWS", "32")
    monkeypatch.setenv("MISTRAL_T4_CACHE", "/somewhere")
    monkeypatch.delenv("MISTRAL_T4_REFERENCE_KERNELS", raising=False)
    info = devices.describe(torch.device("cpu"))
    assert info["settings"].get("MISTRAL_T4_NF4_CUDA_ROWS") == "32"
    assert "MISTRAL_T4_CACHE" not in info["settings"] and "MISTRAL_T4_REFERENCE_KERNELS" not in info["settings"]


def test_decode_layer_fusions_and_early_launch(tiny_random_path, monkeypatch):
    """The decode step's gate/up takes the SwiGLU epilogue unless it carries LoRA deltas (they are added
    before SiLU) or runs the references; on any GPU backend (a T4's too) its norms are `add_rms_norm_fused`;
    its CUDA NF4 matmuls are launched early (programmatic dependent launch) only where
    `kernels.early_launch` says so (sm90 CUDA devices, unless MISTRAL_T4_EARLY_LAUNCH=0), down only
    after gate/up's SwiGLU kernel."""
    from mistral_t4 import kernels
    from mistral_t4.kernels.nf4 import silu_mul
    from mistral_t4.model import FastLinear, FastMistral, LoraPair

    model, _ = loading.load(str(tiny_random_path), quant="nf4", device="cpu")
    fast = FastMistral.from_hf(model, {"nf4_linear": "cuda", "decode_attention": "triton"})
    layer = fast.layers[0]
    assert fast.fused_norms and layer.gate_up.fuses_swiglu
    assert not any(linear.early for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))  # CPU: no early launch
    h = torch.randn(3, layer.gate_up.in_features)
    assert torch.equal(layer.gate_up.swiglu(h), silu_mul(layer.gate_up(h)))
    reference = FastMistral.from_hf(model)  # CPU's choice: the references
    assert not reference.fused_norms and not reference.layers[0].gate_up.fuses_swiglu
    t4 = FastMistral.from_hf(model, {"nf4_linear": "bnb", "decode_attention": "reference"})  # a T4's choice
    assert t4.fused_norms and not any(linear.early for linear in (t4.layers[0].qkv, t4.layers[0].down))

    monkeypatch.setattr(kernels, "early_launch", lambda device: True)
    rank = 2
    lora = LoraPair(torch.zeros(rank, layer.gate_up.in_features), torch.zeros(layer.gate_up.out_features, rank))
    adapted = FastLinear(layer.gate_up.nf4, [lora], reference=False)
    assert not adapted.fuses_swiglu
    assert torch.equal(adapted.swiglu(h, [torch.ones(3, 1)]), silu_mul(layer.gate_up(h)))  # zero delta
    layers = list(fast.layers)
    layers[1].gate_up = adapted
    chained = FastMistral(fast.config, fast.embed, layers, fast.norm, fast.lm_head, [], fast.kernel_choice)
    assert all(linear.early for layer in chained.layers for linear in (layer.qkv, layer.o, layer.gate_up))
    # SiLU in its own kernel where gate/up has an adapter: down follows inductor's kernel there
    assert [layer.down.early for layer in chained.layers] == [index != 1 for index in range(len(layers))]
    eager = FastMistral(fast.config, fast.embed, layers, fast.norm, fast.lm_head, [],
                        {"nf4_linear": "cuda", "decode_attention": "reference"})
    assert not any(linear.early for layer in eager.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
    monkeypatch.undo()

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels.early_launch("cuda") and not kernels.early_launch("cpu")
    monkeypatch.setenv(kernels.EARLY_LAUNCH_ENV, "0")
    assert not kernels.early_launch("cuda")
    monkeypatch.delenv(kernels.EARLY_LAUNCH_ENV)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not kernels.early_launch("cuda")


def test_engine_records_cuda_kernel_plans(tiny_random_path):
    """With the "cuda" NF4 backend the engine's description (benchmark JSON) names the kernel and grid
    each projection's decode matmul takes at its slot count; other backends and > 64 slots: none."""
    from mistral_t4.engine import Engine
    from mistral_t4.kernels import nf4_cuda
    from mistral_t4.model import FastMistral

    model, tokenizer = loading.load(str(tiny_random_path), quant="nf4", device="cpu")
    fast = FastMistral.from_hf(model, {"nf4_linear": "cuda", "decode_attention": "reference"})
    layer = fast.layers[0]
    shapes = {name: (linear.out_features, linear.in_features)
              for name, linear in [("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up), ("down", layer.down)]}
    expected = {1: "nf4_matmul", 8: "nf4_matmul", 32: "nf4_matmul32w", 33: "nf4_matmul64", 64: "nf4_matmul64"}
    for rows, name in expected.items():
        info = Engine(fast, tokenizer, max_batch=rows, max_len=64, compile=False).describe()
        # CPU: one "SM"; gate/up with SiLU in the matmul's epilogue (no adapters here)
        assert info["nf4_cuda_kernels"] == nf4_cuda.describe_plans(rows, shapes, 1, frozenset({"gate_up"}))
        names = {key: plan.split()[0] for key, plan in info["nf4_cuda_kernels"].items()}
        assert names == {"qkv": name, "o": name, "gate_up": name + "_swiglu", "down": name}, (rows, names)
    assert fast.nf4_cuda_plans(65) == {}
    reference = FastMistral.from_hf(model)
    assert "nf4_cuda_kernels" not in Engine(reference, tokenizer, max_batch=4, max_len=64, compile=False).describe()
