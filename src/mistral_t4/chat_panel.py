"""A chat panel for Jupyter and Colab: ipywidgets wired to a `chat.ChatSession`.

The panel holds no chat logic: the session keeps the history and the settings, the
worker generates. The panel only turns widget events into session calls and session
output into widget values:

- Send (or `submit(text)`, the same code path) runs `session.send` on a background
  thread, so the notebook stays responsive while the model answers; each streamed piece
  of text is appended to the transcript as it arrives (widgets may be updated from any
  thread; the kernel forwards the change to the browser).
- The sliders and the adapter dropdown write straight into `session.settings`.
- Clear calls `session.reset()`.

Tests drive it without a browser: `panel.submit(text)`, `panel.wait()`, `panel.transcript`.
"""

from __future__ import annotations

import html
import threading
import time

from mistral_t4.chat import ChatSession

ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System"}
_STYLE = {
    "user": "background:#e8f0fe;border-left:4px solid #1f77b4",
    "assistant": "background:#f6f6f6;border-left:4px solid #d62728",
}
_RENDER_EVERY_S = 0.05  # at most ~20 transcript redraws a second while streaming


class ChatPanel:
    """Input box, Send/Clear buttons, settings and a streamed transcript over one `ChatSession`."""

    def __init__(self, session: ChatSession):
        import ipywidgets as widgets

        self.session = session
        settings = session.settings
        self.input = widgets.Textarea(placeholder="Ask something, then press Send",
                                      layout=widgets.Layout(width="100%", height="5em"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.clear_button = widgets.Button(description="Clear", icon="trash", tooltip="forget the conversation")
        self.temperature = widgets.FloatSlider(value=settings.temperature, min=0.0, max=1.5, step=0.05,
                                               description="temperature", continuous_update=False)
        self.max_new_tokens = widgets.IntSlider(value=settings.max_new_tokens, min=1,
                                                max=max(1024, settings.max_new_tokens), step=1,
                                                description="max tokens", continuous_update=False)
        adapters = session.adapters
        self.adapter = widgets.Dropdown(options=[("None", None)] + [(name, name) for name in adapters],
                                        value=settings.adapter if settings.adapter in adapters else None,
                                        description="LoRA adapter")
        self.adapter.layout.display = None if adapters else "none"  # only offered when there is a choice
        self.transcript_view = widgets.HTML()
        self.status = widgets.HTML()

        self.send_button.on_click(lambda _: self.submit(self.input.value))
        self.clear_button.on_click(lambda _: self.clear())
        self.temperature.observe(lambda change: setattr(settings, "temperature", change["new"]), names="value")
        self.max_new_tokens.observe(lambda change: setattr(settings, "max_new_tokens", change["new"]), names="value")
        self.adapter.observe(lambda change: setattr(settings, "adapter", change["new"]), names="value")

        self.widget = widgets.VBox([
            self.transcript_view,
            self.input,
            widgets.HBox([self.send_button, self.clear_button, self.status]),
            widgets.HBox([self.temperature, self.max_new_tokens, self.adapter]),
        ])
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: tuple[str, str] | None = None  # (question, answer so far) while answering
        self._last_render = 0.0
        self.error: Exception | None = None  # what the last turn raised, if anything
        self._render()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ---------------------------------------------------------------- actions

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, text: str) -> bool:
        """Ask `text` (what the Send button does); returns False if empty or an answer is still running."""
        text = text.strip()
        if not text:
            return False
        if self.busy:
            self.status.value = "<i>still answering the last message</i>"
            return False
        self.input.value = ""
        self.error = None
        with self._lock:
            self._pending = (text, "")
        self._set_busy(True)
        self._render()
        self._thread = threading.Thread(target=self._answer, args=(text,), name="chat-panel", daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current answer is complete; True if it is (False on timeout)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def clear(self) -> None:
        """Forget the conversation (what the Clear button does); refused while an answer is running."""
        if self.busy:
            self.status.value = "<i>wait for the answer to finish before clearing</i>"
            return
        self.session.reset()
        self.error = None
        self.status.value = ""
        self._render()

    # ---------------------------------------------------------------- rendering

    @property
    def messages(self) -> list[dict]:
        """The conversation as shown: the session's history plus the turn being answered."""
        with self._lock:
            pending = self._pending
        shown = list(self.session.history)
        if pending is not None:
            question, answer = pending
            shown += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return shown

    @property
    def transcript(self) -> str:
        """Plain-text transcript ("You: ..." / "Assistant: ..." lines), as rendered."""
        return "\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in self.messages)

    def _render(self) -> None:
        blocks = [
            f'<div style="{_STYLE.get(m["role"], "")};padding:6px 10px;margin:4px 0;white-space:pre-wrap">'
            f'<b>{ROLE_NAMES.get(m["role"], html.escape(m["role"]))}:</b> {html.escape(m["content"])}</div>'
            for m in self.messages
        ]
        if not blocks:
            blocks = ['<div style="color:#777;padding:6px 10px"><i>No messages yet.</i></div>']
        self.transcript_view.value = "".join(blocks)
        self._last_render = time.monotonic()

    # ---------------------------------------------------------------- background turn

    def _answer(self, text: str) -> None:
        started = time.perf_counter()
        try:
            result = self.session.send(text, on_text=self._on_text)
            elapsed = time.perf_counter() - started
            self.status.value = (f"{len(result.tokens)} tokens in {elapsed:.1f} s "
                                 f"({len(result.tokens) / max(elapsed, 1e-9):.1f} tokens/s)")
        except Exception as error:  # noqa: BLE001 - shown in the panel; the next turn may succeed
            self.error = error
            self.status.value = f'<span style="color:#d62728">error: {html.escape(str(error))}</span>'
        finally:
            with self._lock:
                self._pending = None
            self._render()
            self._set_busy(False)

    def _on_text(self, delta: str) -> None:
        with self._lock:
            if self._pending is None:
                return
            question, answer = self._pending
            self._pending = (question, answer + delta)
        if time.monotonic() - self._last_render >= _RENDER_EVERY_S:
            self._render()

    def _set_busy(self, busy: bool) -> None:
        self.send_button.disabled = busy
        self.clear_button.disabled = busy
        if busy:
            self.status.value = "<i>answering...</i>"
