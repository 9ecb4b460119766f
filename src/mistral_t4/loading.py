"""Load a Mistral-architecture checkpoint as a Hugging Face model, in NF4, fp16 or fp32.

NF4 (4-bit NormalFloat, from QLoRA) stores each weight as one of 16 code values plus one
scale per block of 64 weights; double quantization stores those scales in 8 bits too. A
7B model then takes ~3.9 GB instead of 14.5 GB in fp16, which is what lets it live on a
16 GB T4 next to a KV cache for 32 requests. bitsandbytes does the quantization while
`from_pretrained` reads the safetensors shards, one tensor at a time.

The model that comes back is the plain Hugging Face one: it is the reference in tests, the
baseline in the benchmark, and the source of weights for our own engine (`model.py`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mistral_t4 import devices, models

QUANTS = ("nf4", "fp16", "fp32")


class LoadError(ValueError):
    """A checkpoint or adapter that cannot be loaded; the message says why and what to do."""


def load(
    spec: str | None = None,
    quant: str = "nf4",
    lora: str | dict[str, str] | list[str] | None = None,
    device: str | torch.device | None = None,
    memory_cap_gib: float | None = None,
    seed: int = 0,
):
    """Load `spec` (see `models.resolve`) -> (model, tokenizer).

    `lora`: an adapter directory, a list of "NAME=DIR", or {name: dir}; the first is active.
    The model is a `MistralForCausalLM`, or a `peft.PeftModel` around one when adapters are given.
    """
    if quant not in QUANTS:
        raise LoadError(f"quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    device = devices.pick_device(device)
    spec = spec or models.default_spec(device)
    source = models.resolve(spec)
    dtype = torch.float32 if quant == "fp32" else devices.compute_dtype(device)
    if quant == "fp16" and device.type == "cpu":
        raise LoadError("fp16 needs a GPU; on a CPU use quant='fp32' or 'nf4'")

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source.path)
    hint = "" if quant == "nf4" else \
        f"quant='nf4' would need {estimate_weight_bytes(config, 'nf4', dtype) / devices.GIB:.2f} GiB"
    check_fits(estimate_weight_bytes(config, quant, dtype), device, memory_cap_gib, what=f"{spec} in {quant}",
               hint=hint)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if source.random_weights:
        model = random_model(config, quant, dtype, device, seed)
    else:
        model = _from_pretrained(source, quant, dtype, device)
    model.eval()
    if quant == "nf4" and device.type == "cpu":
        exact_cpu_nf4(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora:
        model = attach_adapters(model, lora)
    return model, tokenizer


def _from_pretrained(source, quant, dtype, device):
    from transformers import BitsAndBytesConfig, MistralForCausalLM

    kwargs = dict(dtype=dtype, device_map={"": str(device)}, use_safetensors=True, trust_remote_code=False)
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    try:
        model, info = MistralForCausalLM.from_pretrained(source.path, output_loading_info=True, **kwargs)
    except OSError as error:
        raise LoadError(
            f"could not read the weights of {source.spec!r} ({source.path}): {error}. Only safetensors "
            "checkpoints are loaded; convert a pickle one with "
            "`MistralForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` (transformers 5 writes safetensors)."
        ) from error
    except Exception as error:  # truncated/corrupted shards surface as many exception types
        raise LoadError(
            f"could not load {source.spec!r} ({source.path}): {type(error).__name__}: {error}. A weight file "
            "may be truncated or corrupted: download or convert the checkpoint again."
        ) from error
    # from_pretrained fills weights missing from the files with random values and only logs it
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise LoadError(
            f"{source.spec!r} ({source.path}) lacks {len(missing)} weight(s), e.g. {missing[:3]}: the checkpoint "
            "is incomplete (a shard missing or cut short?); download or convert it again."
        )
    return model


def exact_cpu_nf4(model) -> None:
    """Keep bitsandbytes' CPU NF4 matmul in the compute dtype (fp32).

    On CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights on the first forward and
    multiplies in bfloat16: faster, but then the "fp32" reference is not fp32 and greedy
    tokens drift from any exact implementation. The plain path dequantizes and multiplies
    in the configured compute dtype.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def nf4_config(compute_dtype: torch.dtype):
    """The usual QLoRA recipe: NF4 codes, double-quantized scales, matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def random_model(config, quant: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A `MistralForCausalLM` of `config` with random weights, built one tensor at a time on `device`.

    Throughput does not depend on weight values, so this stands in for Mistral-7B where no hub
    is reachable. NF4 layers are quantized from random fp16 tensors as they are made, so peak
    memory stays near the NF4 size (a 7B model never exists in fp16).
    """
    from transformers import MistralForCausalLM

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    std = getattr(config, "initializer_range", 0.02)
    for module_name, module in list(model.named_modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            if name.endswith("weight") and param.dim() == 1:  # RMSNorm gains
                value = torch.ones(param.shape, dtype=dtype, device=device)
            else:
                value = torch.empty(param.shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)
            if quant == "nf4" and isinstance(module, nn.Linear) and module_name != "lm_head":
                parent, child = _parent(model, module_name)
                setattr(parent, child, _nf4_linear(value, dtype, device))
            else:
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    # the only buffers are rotary inverse frequencies: rebuild that module on the device
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _nf4_linear(weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=dtype,
        compress_statistics=True, quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64, module=layer,
    ).to(device)
    return layer


def _parent(model: nn.Module, dotted: str):
    parent_name, _, child = dotted.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def parse_lora(lora: str | dict[str, str] | list[str] | tuple[str, ...]) -> dict[str, str]:
    """Adapter argument -> {name: directory}. A bare directory is named "default"."""
    if isinstance(lora, dict):
        return {str(k): str(v) for k, v in lora.items()}
    items = [lora] if isinstance(lora, (str, Path)) else list(lora)
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep:
            name, path = ("default" if not adapters else Path(item).name), str(item)
        if not name or not path:
            raise LoadError(f"LoRA adapter {item!r}: expected NAME=DIR or DIR")
        if name in adapters:
            raise LoadError(f"LoRA adapter name {name!r} given twice")
        adapters[name] = path
    return adapters


def attach_adapters(model, lora):
    """Load peft LoRA adapters (safetensors only) onto `model`; the first one is active."""
    from peft import PeftModel

    adapters = parse_lora(lora)
    for name, path in adapters.items():
        _check_adapter_dir(name, Path(path))
    peft_model = None
    for name, path in adapters.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
        except Exception as error:
            raise LoadError(f"LoRA adapter {name!r} at {path}: {type(error).__name__}: {error}") from error
    peft_model.set_adapter(next(iter(adapters)))
    peft_model.eval()
    return peft_model


def _check_adapter_dir(name: str, path: Path) -> None:
    if not path.is_dir():
        raise LoadError(f"LoRA adapter {name!r}: {path} is not a directory")
    if not (path / "adapter_config.json").is_file():
        raise LoadError(f"LoRA adapter {name!r}: {path} has no adapter_config.json (not a peft adapter)")
    if not (path / "adapter_model.safetensors").is_file():
        pickles = [p.name for p in path.glob("*.bin")]
        hint = (
            f" It has {', '.join(pickles)} (pickle), which is never loaded here: load it once with peft and "
            "`save_pretrained(dir, safe_serialization=True)`."
            if pickles else ""
        )
        raise LoadError(f"LoRA adapter {name!r}: {path} has no adapter_model.safetensors.{hint}")


def base_model(model):
    """The `MistralForCausalLM` inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def estimate_weight_bytes(config, quant: str, dtype: torch.dtype = torch.float16) -> int:
    """Bytes the weights take in `quant`: NF4 linears at 4 bits + scales; the rest (embeddings,
    lm_head, norms) in `dtype` (the compute dtype: fp16 on GPU, fp32 on CPU; fp32 for quant fp32)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = layers * (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter)
    other = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + (2 * layers + 1) * hidden
    wide = 4 if quant == "fp32" else torch.empty((), dtype=dtype).element_size()
    if quant == "nf4":
        # 4 bits per weight + double-quantized scales (~8 bits per 64 weights + fp32 per 256 blocks)
        return math.ceil(linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + other * wide
    return (linear + other) * wide


def footprint_bytes(model) -> int:
    """Bytes the loaded model takes: parameters and buffers, and the NF4 weights' scales, which bitsandbytes
    keeps in each weight's `quant_state` where Hugging Face's `get_memory_footprint` does not look (for a
    7B model ~110 MB of double-quantized absmax: 2.4% of what a decode step reads, so the benchmark's floor
    counts them, session 10 on)."""
    base = base_model(model)
    return int(base.get_memory_footprint()) + sum(
        quant_state_bytes(param.quant_state) for param in base.parameters()
        if getattr(param, "quant_state", None) is not None)


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors: absmax and code, and its nested state's (double quantization)."""
    tensors = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def check_fits(needed: int, device: torch.device, cap_gib: float | None, what: str, hint: str = "") -> None:
    """Refuse, with the numbers (and `hint`: what would fit), before allocating what will not fit the GPU or the cap."""
    budget = devices.memory_budget_bytes(device, cap_gib)
    if budget is not None and needed > budget:
        limit = f"the {cap_gib} GiB cap" if cap_gib is not None else "free GPU memory"
        raise MemoryError(
            f"{what} needs {needed / devices.GIB:.2f} GiB but only {budget / devices.GIB:.2f} GiB is left "
            f"under {limit} on {device}" + (f"; {hint}" if hint else "")
        )
