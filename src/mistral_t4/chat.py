"""Chat: a `ChatSession` (history + settings, no UI) and views on it (terminal here, widgets in `chat_panel`).

The session keeps the conversation as chat messages and sends the whole history through the
tokenizer's chat template on every turn, so the model sees the conversation as it was
trained to. Answers stream through the worker: each new piece of text goes to a callback
as soon as its tokens are decoded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ChatSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    adapter: str | None = None
    system: str | None = None


@dataclass
class ChatSession:
    """One conversation served by a `Worker`. Not thread-safe: one view drives it."""

    worker: object
    settings: ChatSettings = field(default_factory=ChatSettings)
    history: list[dict] = field(default_factory=list)

    @property
    def adapters(self) -> list[str]:
        return list(self.worker.engine.adapters)

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def send(self, text: str, on_text: Callable[[str], None] | None = None):
        """Ask `text`; stream the answer to `on_text`; return the `Result`. History grows only on success."""
        s = self.settings
        future = self.worker.submit(
            self.messages(text), max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            adapter=s.adapter, on_token=(lambda token, delta: on_text(delta) if delta else None) if on_text else None,
        )
        result = future.result()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text.strip()}]
        return result

    def reset(self) -> None:
        self.history.clear()


HELP = "Type a message. /reset clears the history, /help shows this, exit (or Ctrl-D) quits."


def run_terminal(session: ChatSession, stdin=None, stdout=None) -> int:
    """The interactive mode of `python -m mistral_t4 chat`: read prompts, stream answers."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(HELP + "\n")
    while True:
        if interactive:
            write("\n> ")
        line = stdin.readline()
        if not line:  # Ctrl-D / end of input
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("exit", "quit", "/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if text == "/help":
            write(HELP + "\n")
            continue
        try:
            write("assistant: ")
            session.send(text, on_text=write)
            write("\n")
        except Exception as error:  # noqa: BLE001 - a bad turn is reported, the chat goes on
            write(f"\n[error] {error}\n")
