"""`llm-serve`: decode from a checkpoint in the terminal, or serve it over an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

EXAMPLES = """
examples:
  llm-serve decode --checkpoint runs/tiny/export --prompt "Once upon a time" --max-tokens 64
  llm-serve decode --checkpoint ~/models/Llama-3.2-1B --prompt "Hi" --temperature 0.7 --seed 1
  llm-serve decode --checkpoint runs/tiny/export --chat --prompt "Tell me a joke" --stop "\\n\\n"
  llm-serve serve --checkpoint runs/tiny/export --host 127.0.0.1 --port 8000
  llm-serve serve --checkpoint runs/tiny/export --port 8000 --set kv_cache_kind=paged max_decode_slots=16
  llm-serve serve --checkpoint runs/tiny/export --set prefix_cache_entries=16   # reuse prompt prefixes

--checkpoint is a native checkpoint folder (config.yml + params/ or tensors/ + tokenizer.json) or a
Hugging Face folder (needs llm-convert). --set takes llm-core config overrides (max_decode_slots,
kv_cache_max_length, kv_cache_kind, kv_page_size, kv_num_pages, max_prefill_length, max_queue_size,
prefix_cache_entries).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-serve",
        description="Generate text from a checkpoint, or serve it over an OpenAI-compatible HTTP API.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--checkpoint", required=True, help="native checkpoint or HF folder")
        q.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")

    d = sub.add_parser(
        "decode",
        help="print a completion, streamed to the terminal",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(d)
    d.add_argument("--prompt", required=True)
    d.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    d.add_argument("--top-k", type=int, default=0)
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--min-p", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    d.add_argument("--presence-penalty", type=float, default=0.0)
    d.add_argument("--frequency-penalty", type=float, default=0.0)
    d.add_argument("--ignore-eos", action="store_true")

    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default=None, help="name clients send (default: folder name)")
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish before closing them (default 30)",
    )
    return p


def _load(args):
    from llm_serve.checkpoint import load_any
    from llm_serve.engine import Engine

    loaded = load_any(args.checkpoint, args.set)
    if loaded.tokenizer is None:
        raise SystemExit(
            f"no tokenizer.json in {args.checkpoint}: copy the model's tokenizer there."
        )
    engine, params = Engine.from_model(loaded.cfg, loaded.model)
    return engine, params, loaded.tokenizer


def decode(args) -> int:
    from llm_serve.sampling import SamplingError, SamplingParams
    from llm_serve.scheduler import Request, Scheduler

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            stop=args.stop,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            ignore_eos=args.ignore_eos,
        )
    except SamplingError as err:
        raise SystemExit(f"--{err.field.replace('_', '-')}: {err}") from None
    engine, params, tok = _load(args)
    prompt = (
        tok.apply_chat_template([{"role": "user", "content": args.prompt}])
        if args.chat
        else args.prompt
    )
    ids = tok.encode(prompt)
    if not 0 < len(ids) < engine.max_len:
        raise SystemExit(
            f"--prompt has {len(ids)} tokens; it must have 1 to {engine.max_len - 1} "
            "(raise kv_cache_max_length with --set)."
        )
    scheduler = Scheduler(engine, params, tok)

    def show(ev):
        sys.stdout.write(ev.text)
        sys.stdout.flush()

    scheduler.submit(Request(ids, sampling, show))
    scheduler.run_until_idle()
    sys.stdout.write("\n")
    return 0


def serve(args) -> int:
    import uvicorn

    from llm_serve.metrics import ServeMetrics
    from llm_serve.scheduler import Scheduler
    from llm_serve.server import create_app

    engine, params, tok = _load(args)
    metrics = ServeMetrics()
    scheduler = Scheduler(engine, params, tok, metrics=metrics)
    name = args.model_name or Path(args.checkpoint).absolute().name
    # the scheduler compiles the model on a warm-up prompt first; /health is 503 until then
    app = create_app(scheduler, tok, name, metrics, warmup_ids=tok.encode("warm up") or [0])
    print(f"llm-serve: serving '{name}' on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn re-raises the signal it drained on once it has shut down: handled here, so a
    # drained shutdown returns (exit status 0) instead of dying by that signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(  # SIGTERM / SIGINT: stop accepting, finish in-flight requests, then exit 0
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=args.drain_timeout,
    )
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return {"decode": decode, "serve": serve}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
