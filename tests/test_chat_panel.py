"""The ipywidgets chat panel driven without a browser, over a real worker and the built-in model."""

from __future__ import annotations

import pytest
import torch

from mistral_t4 import chat_panel
from mistral_t4.chat import ChatSession, ChatSettings
from mistral_t4.chat_panel import ChatPanel
from mistral_t4.engine import make_engine
from mistral_t4.worker import Worker


@pytest.fixture(scope="module")
def smollm2_worker(smollm2_path):
    from mistral_t4 import loading

    model, tokenizer = loading.load(str(smollm2_path), quant="fp32", device="cpu")
    engine = make_engine("mistral_t4", model, tokenizer, max_batch=2, max_len=256, compile=False)
    with Worker(engine) as worker:
        yield worker


@pytest.mark.slow
def test_submit_streams_the_answer_into_the_transcript(smollm2_worker, monkeypatch):
    monkeypatch.setattr(chat_panel, "_RENDER_EVERY_S", 0.0)  # redraw on every streamed piece
    session = ChatSession(smollm2_worker, ChatSettings(max_new_tokens=24))
    panel = ChatPanel(session)
    assert panel.adapter.layout.display == "none"  # no adapters loaded: no dropdown
    seen = []
    panel.transcript_view.observe(lambda change: seen.append(change["new"]), names="value")
    with smollm2_worker.hold():  # the request waits in the queue: the panel is busy meanwhile
        assert panel.submit("What is the capital of France?")
        assert panel.busy and panel.send_button.disabled
        assert not panel.submit("a second message while busy")
        assert "You: What is the capital of France?" in panel.transcript
    assert panel.wait(timeout=300)
    assert panel.error is None
    assert "Paris" in panel.transcript
    assert panel.transcript.startswith("You: What is the capital of France?\nAssistant: ")
    assert "Paris" in panel.transcript_view.value
    assert len(set(seen)) >= 4  # the question alone, then the answer growing piece by piece
    assert len(session.history) == 2 and "Paris" in session.history[1]["content"]
    assert not panel.send_button.disabled and panel.input.value == ""
    assert "tokens in" in panel.status.value


@pytest.mark.slow
def test_send_button_and_clear_button(smollm2_worker):
    session = ChatSession(smollm2_worker, ChatSettings(max_new_tokens=4))
    panel = ChatPanel(session)
    panel.input.value = "Say hello."
    panel.send_button.click()
    assert panel.wait(timeout=300)
    assert len(session.history) == 2 and panel.transcript.count("You: ") == 1
    panel.clear_button.click()
    assert session.history == [] and panel.transcript == ""
    assert "No messages yet" in panel.transcript_view.value


@pytest.mark.slow
def test_sliders_write_the_session_settings(smollm2_worker):
    session = ChatSession(smollm2_worker, ChatSettings(max_new_tokens=3))
    panel = ChatPanel(session)
    panel.temperature.value = 0.7
    panel.max_new_tokens.value = 2
    assert session.settings.temperature == 0.7 and session.settings.max_new_tokens == 2
    panel.submit("Count to ten.")
    assert panel.wait(timeout=300)
    assert panel.error is None
    assert 1 <= len(smollm2_worker.engine.tokenizer(session.history[1]["content"])["input_ids"]) <= 3


def test_empty_input_is_ignored_and_errors_are_shown():
    class FailingWorker:
        class engine:
            adapters = []

        def submit(self, *args, **kwargs):
            raise RuntimeError("no model <here>")

    panel = ChatPanel(ChatSession(FailingWorker()))
    assert not panel.submit("   ")
    assert panel.submit("hello")
    assert panel.wait(timeout=10)
    assert isinstance(panel.error, RuntimeError)
    assert "no model &lt;here&gt;" in panel.status.value  # escaped, not injected as HTML
    assert panel.session.history == [] and panel.transcript == ""


def _tiny_adapter(path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    from mistral_t4.models import tiny_random_config
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(MistralForCausalLM(tiny_random_config()),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path)


def test_adapter_dropdown_lists_loaded_adapters(tiny_random_path, tmp_path):
    from mistral_t4 import loading

    _tiny_adapter(tmp_path / "pirate", seed=1)
    _tiny_adapter(tmp_path / "poet", seed=2)
    model, tokenizer = loading.load(str(tiny_random_path), quant="fp32", device="cpu",
                                    lora={"pirate": str(tmp_path / "pirate"), "poet": str(tmp_path / "poet")})
    engine = make_engine("mistral_t4", model, tokenizer, max_batch=1, max_len=128, compile=False)
    with Worker(engine) as worker:
        session = ChatSession(worker, ChatSettings(max_new_tokens=3))
        panel = ChatPanel(session)
        assert panel.adapter.layout.display is None  # shown
        assert [label for label, _ in panel.adapter.options] == ["None", "pirate", "poet"]
        panel.adapter.value = "poet"
        assert session.settings.adapter == "poet"
        panel.submit("hi")
        assert panel.wait(timeout=120)
        assert panel.error is None and len(session.history) == 2
