"""Small models and references shared by the tests (not fixtures: plain functions)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def tiny_config(**overrides):
    """The built-in tiny-random config, with a wider init (greedy choices far from ties) and any overrides."""
    from mistral_t4.models import tiny_random_config

    config = tiny_random_config()
    for name, value in {"initializer_range": 0.1, "pad_token_id": 2, **overrides}.items():
        setattr(config, name, value)
    return config


def tiny_model(seed: int = 0, **overrides):
    """A float32 tiny Mistral with random weights large enough that greedy choices are not near-ties."""
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(tiny_config(**overrides)).eval()
    return model


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Reference: HF generate on one prompt alone (no padding), greedy, up to `new_tokens` tokens or EOS."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids], device=device), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long,
                                                                                  device=device),
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            temperature=None, top_p=None, top_k=None,
        )
    return out[0, len(prompt_ids):].tolist()


def ragged_prompts(n: int, vocab: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreted_tests(test_file: str) -> None:
    """Run `test_file`'s tests named *interpreted* in a fresh process with TRITON_INTERPRET=1.

    The variable must be set before triton is first imported, so these tests cannot share
    the parent pytest process; in the parent they are skipped and this one test stands in.
    """
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"]
    result = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
