"""Serving benchmark: bench-small (float32) decoding 128 tokens after a 32-token prompt, batch 1 and 8.

Prints tokens/s and time-to-first-token for llm-serve's engine (a batch's prompts prefilled together
with `Engine.prefill_batch`) and for Hugging Face `transformers` `generate` (torch, CPU) on a
LlamaForCausalLM of the same dimensions with random weights, side by side, interleaved, medians of
`--repeats` rounds; each side's achieved GFLOP/s (2 x the weights a token passes through) against
its own fp32 matmul ceiling measured in the same run; the implied weight-read bandwidth at batch 1
(every decode step reads every weight once); the CPU model and the load average before and after.

With `--shared-prefix N` it also measures prefix caching: the time to first token of two
requests that share an N-token system prompt (distinct 16-token questions), each on a fresh engine
with `prefix_cache_entries` 0 and 4, interleaved; the second request reuses the first's KV.

    python benchmarks/serve.py [--batches 1 8] [--new-tokens 128] [--prompt-len 32] [--repeats 3]
                               [--shared-prefix 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from llm_core import build_model, load_config
from llm_serve.engine import Engine
from llm_serve.sampling import SamplingParams


def ours(cfg, model, batch: int, prompts: np.ndarray, new_tokens: int):
    """A function running one timed generation: returns (ttft_s, total_s)."""
    cfg = cfg.replace(max_decode_slots=batch)
    engine, params = Engine.from_model(cfg, model)
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens)

    def run():
        t0 = time.perf_counter()
        state = engine.init_decode_state()
        jobs = [engine.start_prefill(prompts[slot], greedy) for slot in range(batch)]
        for slot, prefix in enumerate(engine.prefill_batch(params, jobs)):
            state = engine.insert(prefix, state, slot)
        jax.block_until_ready(state.tokens)
        ttft = time.perf_counter() - t0
        for _ in range(new_tokens - 1):
            state, out = engine.generate(params, state)
            np.asarray(out.tokens)  # the scheduler reads every step's tokens back too
        return ttft, time.perf_counter() - t0

    run()  # compile
    return run


def hf(cfg, batch: int, prompts: np.ndarray, new_tokens: int):
    """Same for transformers' generate (TTFT: a separate generate of one token); None without it."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.emb_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.resolved_num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor(prompts[:batch], dtype=torch.long)
    mask = torch.ones_like(ids)

    def gen(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return time.perf_counter() - t0

    gen(2)  # warm up
    return lambda: (gen(1), gen(new_tokens))


def maxtext(python: str, batch: int, prompt_len: int, new_tokens: int):
    """MaxText's engine on the same model in its own venv (benchmarks/maxtext_decode.py): each run
    is a fresh process that compiles, then times one pass; returns (ttft_s, total_s)."""
    import json
    import os
    import subprocess

    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maxtext_decode.py")
    argv = [python, child, str(batch), str(new_tokens), str(prompt_len)]

    def run():
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode:
            raise SystemExit(f"MaxText decode failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.split("RESULT ")[1])
        return result["ttft_s"], result["total_s"]

    return run


def torch_matmul_ceiling(n: int = 2048) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    from train import _timed

    x = torch.ones(n, n)
    x @ x
    best = min(_timed(lambda: x @ x) for _ in range(5))
    return 2 * n**3 / best


def shared_prefix_ttft(cfg, model, system: int, repeats: int) -> None:
    """TTFT of a first and a second request sharing `system` tokens, without and with the cache."""
    rng = np.random.default_rng(1)
    head = rng.integers(0, cfg.vocab_size, system).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    results: dict[int, list] = {0: [], 4: []}
    engines = {n: Engine.from_model(cfg.replace(prefix_cache_entries=n), model) for n in results}

    def ttft(engine, params, prompt):
        t0 = time.perf_counter()
        prefix = engine.prefill(params, prompt, greedy)
        jax.block_until_ready(prefix.first.tokens)
        return time.perf_counter() - t0

    for r in range(repeats + 1):  # round 0 compiles
        for n, (engine, params) in engines.items():
            if engine.prefix_cache is not None:
                engine.prefix_cache = type(engine.prefix_cache)(n, engine.page_size)  # empty
            q1, q2 = (rng.integers(0, cfg.vocab_size, 16).tolist() for _ in range(2))
            times = (ttft(engine, params, head + q1), ttft(engine, params, head + q2))
            if r:
                results[n].append(times)
    print(f"shared {system}-token prefix, median of {repeats}: first / second request TTFT")
    for n, ts in results.items():
        first, second = (float(np.median([t[i] for t in ts])) for i in (0, 1))
        label = f"prefix_cache_entries={n}"
        print(f"  {label:>24}: {first * 1e3:7.1f} ms / {second * 1e3:7.1f} ms "
              f"(second / first {second / first:.2f})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shared-prefix", type=int, default=0, help="system prompt tokens (0: skip)")
    ap.add_argument(
        "--maxtext-python",
        metavar="PYTHON",
        help="interpreter of a venv with MaxText (benchmarks/maxtext_venv.sh makes one): adds "
        "MaxText's engine on the same model, interleaved (benchmarks/maxtext_decode.py)",
    )
    args = ap.parse_args()
    from kernels import cpu_model, load_average
    from train import matmul_ceiling

    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    need = max(args.prompt_len + args.new_tokens, args.shared_prefix + 32)
    max_len = -(-need // 16) * 16  # the context this run needs
    cfg = load_config(
        "bench-small.yml", [f"kv_cache_max_length={max_len}", "max_prefill_length=64"]
    )
    model = build_model(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    decode_bytes = (n_params - cfg.vocab_size * cfg.emb_dim) * 4  # the embedding is only gathered
    flops_per_token = 2 * decode_bytes / 4  # one multiply-add per weight a token passes through
    peaks = {"llm-serve": matmul_ceiling(), "transformers": torch_matmul_ceiling()}
    print("fp32 2048^3 matmul ceiling: " + ", ".join(
        f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items() if v
    ))  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (max(args.batches), args.prompt_len)).astype(np.int32)
    print(f"bench-small: {n_params / 1e6:.1f}M params float32, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, devices {jax.devices()}, median of {args.repeats}")  # fmt: skip
    print(f"{'batch':>5} | {'llm-serve tok/s':>15} {'TTFT ms':>8} {'GFLOP/s':>8} | "
          f"{'transformers tok/s':>18} {'TTFT ms':>8} {'GFLOP/s':>8} | {'speed-up':>8}")  # fmt: skip
    ours_tok_s = {}
    for batch in args.batches:
        runners = [ours(cfg, model, batch, prompts, args.new_tokens)]
        runners.append(hf(cfg, batch, prompts, args.new_tokens))
        if args.maxtext_python:
            runners.append(maxtext(args.maxtext_python, batch, args.prompt_len, args.new_tokens))
        times: list[list] = [[] for _ in runners]
        for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
            for i, run in enumerate(runners):
                if run is not None:
                    times[i].append(run())
        a, b, *c = (
            {
                "ttft_s": float(np.median([t[0] for t in ts])),
                "tok_s": batch * args.new_tokens / float(np.median([t[1] for t in ts])),
            }
            if ts
            else None
            for ts in times
        )
        ours_tok_s[batch] = a["tok_s"]

        def cols(r, peak, width):
            if r is None:
                return f"{'n/a':>{width}} {'':>8} {'':>8}"
            gflops = r["tok_s"] * flops_per_token / 1e9
            share = (
                f"{gflops:5.1f} ({100 * gflops * 1e9 / peak:.0f}%)" if peak else f"{gflops:5.1f}"
            )
            return f"{r['tok_s']:{width}.1f} {r['ttft_s'] * 1e3:8.1f} {share:>8}"

        ratio = f"{a['tok_s'] / b['tok_s']:7.2f}x" if b else ""
        print(f"{batch:5d} | {cols(a, peaks['llm-serve'], 15)} | "
              f"{cols(b, peaks['transformers'], 18)} | {ratio}")  # fmt: skip
        if c:
            print(f"      MaxText engine: {cols(c[0], peaks['llm-serve'], 8).strip()} "
                  f"(tok/s, TTFT ms, GFLOP/s); llm-serve / MaxText "
                  f"{a['tok_s'] / c[0]['tok_s']:.2f}x")  # fmt: skip
        if batch == 1:
            gbs = a["tok_s"] * decode_bytes / 1e9
            print(
                f"      batch 1 implied weight reads: {gbs:.1f} GB/s ({decode_bytes / 1e6:.0f} MB/step)"
            )
    if 1 in ours_tok_s and len(ours_tok_s) > 1:
        top = max(ours_tok_s)
        print(f"llm-serve batch {top} / batch 1 tokens/s: {ours_tok_s[top] / ours_tok_s[1]:.2f}x")
    if args.shared_prefix:
        shared_prefix_ttft(cfg, model, args.shared_prefix, args.repeats)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
