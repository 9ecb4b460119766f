"""Command line: `python -m mistral_t4 bench ...` and `python -m mistral_t4 chat ...`."""

from __future__ import annotations

import _thread
import argparse
import json
import signal
import sys
import threading


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return values


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: they pull in torch (seconds), and a Ctrl-C then must land inside main()
    from mistral_t4 import models
    from mistral_t4.bench import ENGINES

    builtin = "; ".join(f"{name}: {text}" for name, text in models.BUILTIN_MODELS.items())
    model_help = (f"hub id (owner/name), local directory, or built-in name ({builtin}). "
                  f"Default: {models.DEFAULT_GPU_MODEL} on a GPU, {models.DEFAULT_CPU_MODEL} on a CPU")
    parser = argparse.ArgumentParser(prog="python -m mistral_t4", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run the concurrent-request benchmark against HF baselines")
    bench.add_argument("--model", help=model_help)
    bench.add_argument("--quant", default="nf4", choices=["nf4", "fp16", "fp32"])
    bench.add_argument("--requests", type=_positive(int), help="concurrent requests (default 32; 8 on CPU)")
    bench.add_argument("--prompt-tokens", type=_positive(int), help="tokens per prompt (default 128; 32 on CPU)")
    bench.add_argument("--new-tokens", type=_positive(int), help="new tokens per request (default 128; 16 on CPU)")
    bench.add_argument("--engines", default="mistral_t4,hf-dynamic,hf-static",
                       help="comma-separated, from: " + ", ".join(ENGINES))
    bench.add_argument("--memory-cap-gib", type=_positive(float), help="cap GPU memory (15 = a T4's budget)")
    bench.add_argument("--sweep", type=_int_list, default=(), help="batch sizes to sweep, e.g. 1,8,32,64,128")
    bench.add_argument("--batch1-tokens", type=int, default=0, help="also time one request generating N tokens")
    bench.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    bench.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="peft LoRA adapter")
    bench.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if present)")
    bench.add_argument("--json", dest="json_path", help="also write the JSON report here")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--seed", type=int, default=0)

    chat = sub.add_parser("chat", help="interactive chat: type a prompt, read the streamed answer")
    chat.add_argument("--model", help=model_help)
    chat.add_argument("--quant", default="nf4", choices=["nf4", "fp16", "fp32"])
    chat.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="peft LoRA adapter")
    chat.add_argument("--adapter", help="which loaded adapter answers (default: none)")
    chat.add_argument("--engine", default="mistral_t4", choices=["mistral_t4", "hf"])
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-new-tokens", type=_positive(int), default=256)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--no-compile", action="store_true")
    chat.add_argument("--device")
    return parser


def _import_torch_holding_ctrl_c() -> None:
    """Import torch with Ctrl-C held back until it is done, then raise KeyboardInterrupt if one came.

    A KeyboardInterrupt raised while torch's C++ extensions initialise escapes through
    pybind11 and aborts the process (std::terminate) instead of reaching our handler.
    """
    if threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401 - signal handlers can only be set from the main thread
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _redeliver_lost_ctrl_c(unraisable) -> None:
    """`sys.unraisablehook`: a Ctrl-C that lands inside a finalizer (`__del__`, run by the
    garbage collector at any moment) is swallowed by Python, and the chat would then sit at
    its prompt. Raise it again in the main thread, where `main` handles it: from a timer
    thread, a moment later, since raised at once it would land in this hook and be swallowed too."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        threading.Timer(0.01, _thread.interrupt_main).start()
    else:
        sys.__unraisablehook__(unraisable)


def _forget_interrupt_seen_by_exec() -> None:
    """Clear CPython's flag for a KeyboardInterrupt that left code run by `exec` of a string.

    When a Ctrl-C lands while `exec` runs a string (dataclasses and namedtuple build methods so,
    e.g. while transformers imports), CPython sets a flag saying a KeyboardInterrupt went unhandled
    and, when `python -m` finishes, ends the process by SIGINT whatever `main` returned, even
    though the exception was caught here. Each `exec` of a string clears the flag before it runs
    and sets it only if a KeyboardInterrupt leaves it: an empty one leaves it clear."""
    exec("pass", {})


def main(argv: list[str] | None = None) -> int:
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_lost_ctrl_c
    try:
        return _main(argv)
    finally:
        sys.unraisablehook = previous_hook


def _main(argv: list[str] | None) -> int:
    try:
        _import_torch_holding_ctrl_c()
        args = build_parser().parse_args(argv)  # inside the try: building the parser imports the rest (slow)
        return _bench(args) if args.command == "bench" else _chat(args)
    except KeyboardInterrupt:  # Ctrl-C: a short message, no traceback; open workers were closed on the way out
        _forget_interrupt_seen_by_exec()
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, MemoryError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _bench(args) -> int:
    from mistral_t4.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(
        model=args.model, quant=args.quant, requests=args.requests, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, engines=tuple(e.strip() for e in args.engines.split(",") if e.strip()),
        memory_cap_gib=args.memory_cap_gib, compile=False if args.no_compile else None, sweep=args.sweep,
        batch1_tokens=args.batch1_tokens, lora=args.lora, device=args.device, json_path=args.json_path,
        progress=not args.no_progress, seed=args.seed,
    )
    report = run_benchmark(cfg, log=lambda text: print(text, file=sys.stderr if text.startswith("[") else sys.stdout,
                                                       flush=True))
    print(json.dumps(report), flush=True)
    ok = all(r.get("requests_ok") == r.get("requests_total") for r in report["engines"].values() if "skipped" not in r)
    return 0 if ok else 1


def _chat(args) -> int:
    from mistral_t4 import loading
    from mistral_t4.chat import ChatSession, ChatSettings, run_terminal
    from mistral_t4.engine import Engine, make_engine
    from mistral_t4.worker import Worker

    print("loading...", file=sys.stderr, flush=True)
    model, tokenizer = loading.load(args.model, quant=args.quant, lora=args.lora or None, device=args.device)
    print(f"loaded: {loading.footprint_bytes(model) / 2**30:.2f} GiB of weights ({args.quant})", file=sys.stderr)
    engine = make_engine(args.engine, model, tokenizer, max_batch=4, max_len=4096,
                         compile=False if args.no_compile else None)
    if isinstance(engine, Engine):  # which kernels run (and on a T4 the NF4 race that chose them)
        print(engine.kernels_line(), file=sys.stderr)
    if getattr(engine, "use_graph", False):
        print("compiling the decode step (once)...", file=sys.stderr, flush=True)
        print(f"ready after {engine.warmup():.0f} s", file=sys.stderr, flush=True)
    if args.adapter is not None and args.adapter not in engine.adapters:
        print(f"error: unknown adapter {args.adapter!r} (loaded: {engine.adapters or 'none'})", file=sys.stderr)
        return 2
    settings = ChatSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            adapter=args.adapter, system=args.system)
    with Worker(engine) as worker:
        return run_terminal(ChatSession(worker, settings))
