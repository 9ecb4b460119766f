"""models.py: spec parsing, local checkpoint checks, the built-ins and their cache."""

import json
import pathlib

import pytest
import torch
from transformers import AutoTokenizer, MistralForCausalLM

from mistral_t4 import models
from mistral_t4.models import ModelSpecError, resolve


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> pathlib.Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MISTRAL_T4_CACHE", str(cache))
    return cache


def write_checkpoint(directory: pathlib.Path, config: dict, weight_files=("model.safetensors",)) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    for name in weight_files:
        (directory / name).write_bytes(b"")
    return directory


MISTRAL_CONFIG = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}


def assert_lists_accepted_forms(message: str) -> None:
    for name in models.BUILTIN_MODELS:
        assert name in message
    assert "owner/name" in message and "local" in message


@pytest.mark.parametrize("spec", ["", " ", "tiny-random ", "no such model", "a/b/c", "../no/such/dir", "-x/y", "x//y"])
def test_bad_specs_list_the_accepted_forms(spec):
    with pytest.raises(ModelSpecError) as error:
        resolve(spec)
    assert_lists_accepted_forms(str(error.value))


def test_a_file_is_not_a_checkpoint(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelSpecError, match="not a checkpoint directory") as error:
        resolve(str(file))
    assert_lists_accepted_forms(str(error.value))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve(str(tmp_path))


def test_llama_checkpoint_is_refused_naming_what_was_found(tmp_path):
    path = write_checkpoint(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ModelSpecError) as error:
        resolve(str(path))
    message = str(error.value)
    assert "'llama'" in message and "LlamaForCausalLM" in message and "convert" in message


def test_pickle_only_checkpoint_is_refused_with_the_conversion(tmp_path):
    path = write_checkpoint(tmp_path / "pickled", MISTRAL_CONFIG, weight_files=("pytorch_model.bin",))
    with pytest.raises(ModelSpecError) as error:
        resolve(str(path))
    assert "pytorch_model.bin" in str(error.value) and "save_pretrained(dir)" in str(error.value)


def test_checkpoint_without_weights_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "empty", MISTRAL_CONFIG, weight_files=())
    with pytest.raises(ModelSpecError, match="no \\*.safetensors"):
        resolve(str(path))


def test_local_mistral_checkpoint(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "owner" / "name", MISTRAL_CONFIG, ("model.safetensors", "pytorch_model.bin"))
    assert resolve(str(path)) == models.ModelSource(str(path), str(path.resolve()), "local", random_weights=False)
    monkeypatch.chdir(tmp_path)  # an existing directory wins over the hub id it looks like
    assert resolve("owner/name").path == str(path.resolve())


@pytest.mark.parametrize("spec", [models.DEFAULT_GPU_MODEL, "TinyLlama/x_1.1B-v0.6"])
def test_hub_id(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve(spec) == models.ModelSource(spec, spec, "hub", random_weights=False)


def test_default_spec(monkeypatch):
    assert models.default_spec("cpu") == models.DEFAULT_CPU_MODEL == "smollm2-mistral"
    assert models.default_spec("cuda:0") == models.default_spec(torch.device("cuda")) == models.DEFAULT_GPU_MODEL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.default_spec() == models.DEFAULT_GPU_MODEL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.default_spec() == models.DEFAULT_CPU_MODEL


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MISTRAL_T4_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("MISTRAL_T4_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(models.sys, "platform", "linux")
    assert models.cache_dir() == tmp_path / "xdg" / "mistral_t4"


def test_mistral_tokenizer_matches_mistral_common():
    """Same ids as mistral-common's own v1 tokenizer, plain text and Instruct chats."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer, reference = models.mistral_tokenizer(), MistralTokenizer.v1()
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (32000, 1, 2, 0)
    raw = reference.instruct_tokenizer.tokenizer
    for text in ["Hello", " leading", "a  b   c ", "def f(x):\n    return x**2", "üñí 日本語 🙂\t"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == raw.encode(text, bos=True, eos=False)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    chats = [
        [UserMessage(content="What is the capital of France?")],
        [SystemMessage(content="Be brief."), UserMessage(content="Hi"), AssistantMessage(content="Hello!"),
         UserMessage(content="And Spain?")],
    ]
    for chat in chats:
        messages = [{"role": message.role, "content": message.content} for message in chat]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == reference.encode_chat_completion(ChatCompletionRequest(messages=chat)).tokens


def test_random_7b_is_the_exact_7b_shape_with_the_real_tokenizer(fresh_cache):
    source = resolve("random-7b")
    assert (source.kind, source.random_weights) == ("builtin", True)
    path = pathlib.Path(source.path)
    assert not list(path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    expected = dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, sliding_window=4096, rms_norm_eps=1e-5,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu",
    )
    assert {key: config[key] for key in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 32000
    assert tokenizer("Hello")["input_ids"] == [1, 22557]  # <s> ▁Hello
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "<s>[INST] Hi [/INST]"


def tiny_logits(path: pathlib.Path) -> torch.Tensor:
    model = MistralForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits  # (2, seq, 32000)


def test_tiny_random_round_trip_is_deterministic(tmp_path, monkeypatch):
    logits = []
    for name in ("first", "second"):
        monkeypatch.setenv("MISTRAL_T4_CACHE", str(tmp_path / name))
        source = resolve("tiny-random")
        assert (source.kind, source.random_weights) == ("builtin", False)
        assert pathlib.Path(source.path).is_relative_to(tmp_path / name)
        logits.append(tiny_logits(pathlib.Path(source.path)))
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    last = logits[0][:, -1]  # (2, vocab)
    assert last.std(dim=-1).min() > 0.5  # not the near-uniform output of a 0.02 init
    assert last.argmax(-1)[0] != last.argmax(-1)[1]


def test_smollm2_says_paris(smollm2_path):
    model = MistralForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_checkpoint_matches_transformers_gguf_loader(smollm2_path):
    """An independent dequantise + q/k un-permute (transformers' GGUF reader) gives the same logits."""
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] is None
    assert config["rope_parameters"]["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    gguf_path = models.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = MistralForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    ids = tokenizer("In 1789, the people of Paris", return_tensors="pt")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0, 1:5].tolist()) == ["Ġ", "1", "7", "8"]  # digits split one by one
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-4)


def test_second_resolve_reuses_the_cache(smollm2_path, model_cache, monkeypatch):
    weights = smollm2_path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    monkeypatch.setenv("MISTRAL_T4_CACHE", str(model_cache))
    monkeypatch.setitem(models._BUILDERS, "smollm2-mistral", lambda out: pytest.fail("converted twice"))
    assert pathlib.Path(resolve("smollm2-mistral").path) == smollm2_path
    assert weights.stat().st_mtime_ns == before


def test_interrupted_build_leaves_nothing(fresh_cache, monkeypatch):
    def interrupted(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(models._BUILDERS, "tiny-random", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve("tiny-random")
    assert list(fresh_cache.iterdir()) == []


def test_concurrent_build_loser_uses_the_winner(fresh_cache, monkeypatch):
    """While this build runs, another finishes first: its checkpoint stays and is returned."""
    build = models._BUILDERS["tiny-random"]

    def slower(out):
        monkeypatch.setitem(models._BUILDERS, "tiny-random", build)
        winner = pathlib.Path(resolve("tiny-random").path)  # the other process, finishing first
        (winner / "winner").write_text("")
        build(out)

    monkeypatch.setitem(models._BUILDERS, "tiny-random", slower)
    path = pathlib.Path(resolve("tiny-random").path)
    assert (path / "winner").exists() and (path / "model.safetensors").exists()
    assert [entry.name for entry in fresh_cache.iterdir()] == ["tiny-random"]
