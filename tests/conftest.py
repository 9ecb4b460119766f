"""Session fixtures: built-in checkpoints built once per test session, in one shared cache.

The cache is $MISTRAL_T4_CACHE when set (scripts/test.sh sets it), else the repository's
`.cache/mistral_t4`, so repeated runs reuse the converted SmolLM2 checkpoint.
"""

import os
import pathlib

import pytest

from mistral_t4 import models

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MISTRAL_T4_CACHE") or REPO / ".cache" / "mistral_t4")


def _resolve_in(cache: pathlib.Path, spec: str) -> pathlib.Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MISTRAL_T4_CACHE", str(cache))
        return pathlib.Path(models.resolve(spec).path)


@pytest.fixture(scope="session")
def smollm2_path(model_cache) -> pathlib.Path:
    """The converted SmolLM2-135M-Instruct MistralForCausalLM checkpoint directory."""
    return _resolve_in(model_cache, "smollm2-mistral")


@pytest.fixture(scope="session")
def tiny_random_path(model_cache) -> pathlib.Path:
    """The 2-layer random Mistral checkpoint directory (float32 safetensors + tokenizer)."""
    return _resolve_in(model_cache, "tiny-random")
