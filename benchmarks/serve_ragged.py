"""Decoding next to a long request: llm-serve's decode step with one long request and short ones.

bench-small (float32, 2048-position cache), `--batch` slots: slot 0 holds a `--long`-token prompt,
the others `--short` tokens, so the decode step works on a cache length bucket of the long one. Each
side is the same engine (contiguous and paged caches) with decode attention either by llm-kernels'
C++ kernel, which reads each row only up to its own position (the default on the CPU), or by the
path before it: XLA's einsums over the whole bucket, masked (contiguous), and the jnp reference that
gathers every row's pages (paged); an int8 cache (`--kv-cache-dtype int8`) was dequantized first.
The sides are interleaved, `--steps` decode steps per round, median of `--repeats` rounds; prints
ms per step, tokens/s, the CPU model and the load average before and after.

    python benchmarks/serve_ragged.py [--batch 8] [--long 1800] [--short 32] [--steps 32]
                                      [--kv-cache-dtype auto|int8]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import jax
import numpy as np
from flax import nnx
from kernels import cpu_model, load_average

import llm_kernels
from llm_core import build_model, load_config
from llm_core.layers import attention_ops
from llm_serve.engine import Engine
from llm_serve.sampling import SamplingParams


@contextlib.contextmanager
def decode_attention_before_the_kernel():
    """While tracing: contiguous caches take XLA's masked einsums, paged pools the jnp reference,
    int8 caches are dequantized first."""
    applies, paged = attention_ops.decode_kernel_applies, llm_kernels.paged_attention
    attention_ops.decode_kernel_applies = lambda *_: False  # int8 caches ask it too
    llm_kernels.paged_attention = functools.partial(paged, backend="reference")
    try:
        yield
    finally:
        attention_ops.decode_kernel_applies, llm_kernels.paged_attention = applies, paged


def filled_engine(cfg, model, kind: str, prompts: list[np.ndarray], new_tokens: int):
    engine, params = Engine.from_model(cfg, model, kv_cache_kind=kind)
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    state = engine.init_decode_state()
    for slot, prompt in enumerate(prompts):
        if not engine.reserve(slot, len(prompt) + new_tokens):
            raise SystemExit(f"too few KV pages for slot {slot}")
        state = engine.insert(engine.prefill(params, prompt, greedy), state, slot)
    return engine, params, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--long", type=int, default=1800)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    overrides = [f"max_decode_slots={args.batch}", "kv_cache_max_length=2048",
                 f"kv_cache_dtype={args.kv_cache_dtype}"]  # fmt: skip
    cfg = load_config("bench-small.yml", overrides)
    new_tokens = args.steps * (args.repeats + 1) + 1
    if args.long + new_tokens > cfg.kv_cache_max_length:
        raise SystemExit(
            f"--long {args.long} + {new_tokens} new tokens exceed kv_cache_max_length "
            f"{cfg.kv_cache_max_length}"
        )
    model = build_model(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = [args.long] + [args.short] * (args.batch - 1)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    sides = {}
    for kind in ("contiguous", "paged"):
        for side in ("c++ kernel", "before"):
            ctx = (
                decode_attention_before_the_kernel()
                if side == "before"
                else contextlib.nullcontext()
            )
            with ctx:
                engine, params, state = filled_engine(cfg, model, kind, prompts, new_tokens)
                for _ in range(args.steps):  # compiles (under the patch) and warms up
                    state, out = engine.generate(params, state)
                np.asarray(out.tokens)
            sides[(kind, side)] = [engine, params, state]
    times = {key: [] for key in sides}
    for _ in range(args.repeats):
        for key, entry in sides.items():
            engine, params, state = entry
            start = time.perf_counter()
            for _ in range(args.steps):
                state, out = engine.generate(params, state)
                np.asarray(out.tokens)  # the scheduler reads every step's tokens back too
            times[key].append((time.perf_counter() - start) / args.steps)
            entry[2] = state
    print(f"bench-small float32, {args.kv_cache_dtype} KV cache, batch {args.batch}: one {args.long}-token prompt and "
          f"{args.batch - 1} of {args.short}; {args.steps} steps per round, median of {args.repeats}")  # fmt: skip
    for kind in ("contiguous", "paged"):
        ours = statistics.median(times[(kind, "c++ kernel")])
        before = statistics.median(times[(kind, "before")])
        print(f"  {kind:10s}: c++ kernel {ours * 1e3:6.2f} ms/step ({args.batch / ours:7.1f} tok/s), "
              f"before {before * 1e3:6.2f} ms/step ({args.batch / before:7.1f} tok/s), "
              f"speed-up {before / ours:4.2f}x")  # fmt: skip
    print(f"load average after: {load_average()}")
    jax.clear_caches()


if __name__ == "__main__":
    main()
