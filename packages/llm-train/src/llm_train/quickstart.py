"""Quick start: train a small Llama-style model on the Python standard library's own sources.

Every Python install ships its standard library as `.py` files (found through `sysconfig`), so the
corpus is always there. The run: train a byte-level BPE tokenizer on it (`tokenizers`), train a
small model for a few minutes on the CPU (loss falls clearly), write a checkpoint, export the
parameters, load them back with `llm_core.load` and generate code from a prompt.

    python -m llm_train.quickstart                 # about 3 minutes on 2 CPU cores
    python -m llm_train.quickstart --minutes 1     # shorter
    python -m llm_train.quickstart --steps 1000 --out runs/qs   # longer; re-running resumes
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import time

import numpy as np

from llm_train.host_memory import rerun_with_huge_pages
from llm_train.start_up import pause_gc

# Sized for about three minutes on 2 CPU cores (measured on the held-out loss of stdlib
# subpackages the run never sees): at this budget a small model that takes more steps beats a larger
# one (d_model 192: 2.4M parameters, 700 steps, 4.14 nats/token; d_model 96: 0.9M, 1300 steps, 3.79).
# 2000 steps fit since the gated MLP's backward got cheaper (eval loss 3.79 at 1500 -> 3.71), and
# 2500 since every Linear merges its leading axes (178 s in all, eval loss 3.71 -> 3.62).
MODEL = {
    "model_family": "llama",
    "vocab_size": 2048,
    "emb_dim": 96,
    "num_layers": 4,
    "num_heads": 3,
    "num_kv_heads": 1,
    "head_dim": 32,
    "mlp_dim": 288,
    "seq_len": 128,
    "max_position_embeddings": 512,
    "global_batch_size": 16,
}
TRAIN = {
    "learning_rate": 3e-3,
    "warmup_steps": 30,
    "lr_schedule": "cosine",
    "weight_decay": 0.1,
    "eval_fraction": 0.03,
    "eval_batches": 4,
    "dataset_kind": "text",
    # one file fills dozens of rows: shuffled rows mix files in every batch (4.90 -> 4.30 held-out)
    "shuffle_window": 2048,
    "log_every": 25,
}


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise SystemExit(f"No .py files found in the standard library folder {root}.")
    return files


def generate_with_llm_serve(
    model, tokenizer_path: str, prompt: str, max_new: int, temperature: float, seed: int
) -> str | None:
    """The sample through llm-serve's engine and scheduler, when llm-serve is installed."""
    try:
        from llm_serve import Engine, SamplingParams, Scheduler, Tokenizer, generate_text
    except ImportError:
        return None
    tokenizer = Tokenizer.from_file(tokenizer_path)
    prompt_ids = tokenizer.encode(prompt)
    overrides = {
        "max_decode_slots": 1,
        "kv_cache_max_length": min(model.cfg.max_position_embeddings, len(prompt_ids) + max_new),
    }
    model.cfg = model.cfg.replace(**overrides)
    engine, params = Engine.from_model(model.cfg, model)
    sampling = SamplingParams(max_tokens=max_new, temperature=temperature, seed=seed)
    return generate_text(Scheduler(engine, params, tokenizer), prompt_ids, sampling).text


def generate(model, tokenizer, prompt: str, max_new: int, temperature: float, seed: int) -> str:
    """Greedy (temperature 0) or temperature sampling with the model's KV cache (no llm-serve)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    cfg = model.cfg
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, pos, cache):
        return nnx.merge(graphdef, state).forward_with_cache(ids, pos, cache)

    ids = tokenizer.encode(prompt)
    max_len = min(cfg.max_position_embeddings, len(ids) + max_new)
    cache = model.init_cache(1, max_len, jnp.float32)
    logits, cache = forward(
        state, jnp.asarray([ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32)[None], cache
    )
    rng = np.random.default_rng(seed)
    out = []
    for pos in range(len(ids), max_len):
        last = np.asarray(logits[0, -1], np.float64)
        if temperature <= 0:
            tok = int(last.argmax())
        else:
            p = np.exp((last - last.max()) / temperature)
            tok = int(rng.choice(len(p), p=p / p.sum()))
        if tok == tokenizer.eos_id:
            break
        out.append(tok)
        logits, cache = forward(
            state, jnp.asarray([[tok]], jnp.int32), jnp.asarray([[pos]], jnp.int32), cache
        )
    return tokenizer.decode(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llm_train.quickstart",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m llm_train.quickstart\n"
        "  python -m llm_train.quickstart --minutes 1 --prompt 'def fib(n):'\n"
        "  python -m llm_train.quickstart --steps 1000 --out runs/qs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=2500, help="training steps (schedule length)")
    p.add_argument("--minutes", type=float, default=3.5, help="stop training after this long")
    p.add_argument(
        "--out", default="runs", help="base output folder (run folder: <out>/quickstart)"
    )
    p.add_argument("--prompt", default="def get", help="prompt for the code sample")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="0 = greedy; 0.5 keeps the small model's code closest to Python",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args(argv)
    if argv is None:  # the command line: huge pages for the steps' buffers (llm_train.host_memory)
        rerun_with_huge_pages("llm_train.quickstart", sys.argv[1:])

    t_start = time.time()
    pause_gc()  # until the first train step is done (llm_train.start_up)
    import llm_core
    from llm_core import count_params
    from llm_train.data.tokenizer import load_tokenizer, train_bpe
    from llm_train.export import export
    from llm_train.trainer import train

    run = os.path.join(args.out, "quickstart")
    os.makedirs(run, exist_ok=True)
    files = stdlib_files()
    size = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"corpus: {len(files)} files, {size:.1f} MB from {os.path.dirname(files[0])}")
    tok_path = os.path.join(run, "tokenizer.json")
    if not os.path.exists(tok_path):
        t = time.time()
        train_bpe(files, MODEL["vocab_size"], tok_path)
        print(f"tokenizer: byte-level BPE, {MODEL['vocab_size']} tokens, {time.time() - t:.1f}s")
    values = {
        **MODEL,
        **TRAIN,
        "steps": args.steps,
        "dataset_path": os.path.join(sysconfig.get_paths()["stdlib"], "*.py"),
        "tokenizer_path": tok_path,
        "base_output_dir": args.out,
        "run_name": "quickstart",
        "eval_every": max(args.steps // 4, 1),  # a key=value override wins
    }
    cfg = llm_core.load_config(
        "pretrain.yml", [f"{k}={v}" for k, v in values.items()] + list(args.overrides)
    )
    n_params = count_params(cfg)
    print(
        f"model: {n_params / 1e6:.2f}M parameters; training up to {cfg.steps} steps "
        f"or {args.minutes:g} minutes on {cfg.global_batch_size}x{cfg.seq_len} token batches"
    )
    result = train(cfg, time_limit_s=args.minutes * 60)
    if result.losses:
        steps = sorted(result.losses)
        head = np.mean([result.losses[s] for s in steps[:10]])
        tail = np.mean([result.losses[s] for s in steps[-10:]])
        print(
            f"loss: first {result.losses[steps[0]]:.3f} (mean of first 10 steps {head:.3f}) -> "
            f"last {result.losses[steps[-1]]:.3f} (mean of last 10 {tail:.3f}), "
            f"steps {steps[0]}..{steps[-1]}"
        )
    for step, loss in sorted(result.eval_losses.items()):
        print(f"eval loss at step {step}: {loss:.3f} (perplexity {np.exp(loss):.1f})")
    exported = export(cfg, os.path.join(run, "export"))
    print(f"checkpoints: {os.path.join(run, 'checkpoints')}; exported params: {exported}")
    model = llm_core.load(exported)
    sample = generate_with_llm_serve(
        model, tok_path, args.prompt, args.max_new_tokens, args.temperature, 0
    )
    if sample is None:
        tokenizer = load_tokenizer(tok_path)
        sample = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, 0)
    print("-" * 30 + " sample " + "-" * 30)
    print(args.prompt + sample)
    print("-" * 68)
    print(f"quickstart finished in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
