"""Training throughput of llm-train on the CPU against transformers' LlamaForCausalLM (torch eager).

Model: configs/bench-small.yml (vocab 32000, d_model 512, 8 layers, 8 heads, 4 kv heads, head_dim
64, SwiGLU 1408, seq 256, batch 4, float32), AdamW, synthetic tokens. Prints tokens/s, MFU against
the CPU's measured fp32 matmul ceiling (timed here), the ratio to the torch baseline (run in a
child process with 2 threads), and the start-up: seconds from launching `llm-train train
bench-small steps=1` to its first progress line, with an empty and with a warm compilation cache.
The throughput child runs under glibc's huge-page tunable, as `llm-train train` re-runs itself for
runs of at least 50 steps (llm_train.host_memory); the one-step start-up runs do not re-run.

Each side runs alone in its own child process, the sides alternating for --rounds rounds; the
figures are medians over the rounds. The CPU model and the load average are printed before and
after, and each side's achieved FLOP/s against the fp32 matmul ceiling measured here (jax) and by
torch itself.

    python benchmarks/train.py [--steps 8] [--threads 2] [--rounds 3] [--skip-torch]
    python benchmarks/train.py --also dtype=bfloat16   # one more llm-train variant, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TORCH_CHILD = r"""
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
steps, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
ids = torch.randint(0, 32000, (4, 257))
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
step = sorted(times[2:])[len(times[2:]) // 2]
a = torch.ones(2048, 2048)
a @ a
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t)
print("RESULT", json.dumps({"step_s": step, "tokens_per_sec": 4 * 256 / step, "matmul_flops": 2 * 2048**3 / best}))
"""


def first_step_via_cli(out_dir: str, run_name: str) -> float:
    """Seconds from starting `llm-train train bench-small` (a fresh process, as a user runs it) to
    its first progress line, printed once step 1 has finished. The clock is this process's,
    read just before the spawn (a child's own start time from psutil is only good to ~1 s)."""
    cmd = [sys.executable, "-m", "llm_train.cli", "train", "bench-small", "steps=1"]
    cmd += [f"base_output_dir={out_dir}", f"run_name={run_name}", "console_progress=true"]
    start = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first = None
    for line in proc.stderr:
        if first is None and line.lstrip("\r").startswith("step 1/"):
            first = time.time() - start
    if proc.wait() or first is None:
        raise SystemExit(f"llm-train train failed (exit {proc.returncode})")
    return first


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    best = min(_timed(lambda: f(x, x).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_jax(steps: int, overrides: list[str] | None = None) -> dict:
    import jax
    import numpy as np

    from llm_core import load_config
    from llm_train.data.pipeline import synthetic_dataset
    from llm_train.metrics import flops_per_token
    from llm_train.optim import make_optimizer
    from llm_train.sharding import build_mesh
    from llm_train.step import Steps

    cfg = load_config("bench-small", [f"steps={steps + 2}", "warmup_steps=0", *(overrides or [])])
    s = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    s.start_compile()  # as the trainer does: compile the step while the state is created
    data = iter(synthetic_dataset(cfg, 0))
    state = s.init()
    times = []
    for _ in range(steps + 2):
        batch = {k: jax.device_put(v, s.batch_sharding) for k, v in next(data).items()}
        t = time.perf_counter()
        state, m = s.run_train_step(state, batch)
        loss = float(m["loss"])
        times.append(time.perf_counter() - t)
    step = float(np.median(times[2:]))
    tokens = cfg.global_batch_size * cfg.seq_len
    return {
        "step_s": step,
        "tokens_per_sec": tokens / step,
        "flops_per_token": flops_per_token(cfg),
        "final_loss": loss,
        "device": str(jax.devices()[0].device_kind),
    }


def run_child(
    argv: list[str], what: str, env: dict | None = None, python: str = sys.executable
) -> dict:
    """Run `python argv...` in a fresh process; the JSON it prints after RESULT."""
    proc = subprocess.run([python, *argv], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ")[1])


def run_torch(steps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return run_child(["-c", TORCH_CHILD, str(steps), str(threads)], "torch baseline", env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the baseline")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--maxtext-python",
        metavar="PYTHON",
        help="interpreter of a venv with MaxText (benchmarks/maxtext_venv.sh makes one): adds "
        "MaxText's own train loop on the same model, interleaved (benchmarks/maxtext_train.py)",
    )
    p.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides of one more llm-train variant (e.g. dtype=bfloat16), interleaved",
    )
    p.add_argument("--child-jax", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_jax:  # one llm-train run in this fresh process
        print("RESULT " + json.dumps(run_jax(args.steps, json.loads(args.child_overrides))))
        return
    from kernels import cpu_model, load_average

    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    peak = matmul_ceiling()
    print(f"matmul ceiling (fp32 2048^3, jax): {peak / 1e9:,.1f} GFLOP/s")
    runs: dict[str, list[dict]] = {"jax": [], "torch": [], "also": [], "maxtext": []}
    starts: dict[str, list[float]] = {"cold": [], "warm": []}
    cache_root = tempfile.mkdtemp(prefix="bench_start_")
    for i in range(args.rounds):
        # start-up: a fresh output folder (cold compilation cache), then the same folder again
        out = os.path.join(cache_root, f"round{i}")
        starts["cold"].append(first_step_via_cli(out, "cold"))
        starts["warm"].append(first_step_via_cli(out, "warm"))
        runs["jax"].append(run_jax_child(args.steps))
        if args.also:
            runs["also"].append(run_jax_child(args.steps, args.also))
        if not args.skip_torch:
            runs["torch"].append(run_torch(args.steps, args.threads))
        if args.maxtext_python:
            child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maxtext_train.py")
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            run = run_child([child, str(args.steps)], "MaxText", env, args.maxtext_python)
            runs["maxtext"].append(run)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    jx_tps, flops_tok = median("jax", "tokens_per_sec"), runs["jax"][0]["flops_per_token"]
    mfu = jx_tps * flops_tok / peak
    print(
        f"llm-train bench-small: {jx_tps:,.0f} tokens/s, {jx_tps * flops_tok / 1e9:,.1f} GFLOP/s "
        f"(MFU {100 * mfu:.1f}% of the jax ceiling) "
        f"(rounds: {', '.join(f'{r["tokens_per_sec"]:,.0f}' for r in runs['jax'])} tokens/s)"
    )
    cold, warm = (statistics.median(starts[k]) for k in ("cold", "warm"))
    print(
        f"llm-train train bench-small: first step printed {cold:.1f}s after the command started "
        f"with an empty compilation cache, {warm:.1f}s with the cache of the run before (target "
        f"<= 5 s) (rounds: cold {', '.join(f'{t:.1f}' for t in starts['cold'])}; warm "
        f"{', '.join(f'{t:.1f}' for t in starts['warm'])})"
    )
    shutil.rmtree(cache_root, ignore_errors=True)
    result = {"jax": runs["jax"], "matmul_ceiling_flops": peak, "mfu": mfu, "first_step_s": starts}
    if runs["also"]:
        also = median("also", "tokens_per_sec")
        print(
            f"llm-train with {' '.join(args.also)}: {also:,.0f} tokens/s, {also / jx_tps:.2f}x the "
            f"default (rounds: {', '.join(f'{r["tokens_per_sec"]:,.0f}' for r in runs['also'])})"
        )
        result["also"] = runs["also"]
    if runs["torch"]:
        th_tps, th_peak = median("torch", "tokens_per_sec"), median("torch", "matmul_flops")
        t_flops = th_tps * flops_tok
        print(
            f"torch LlamaForCausalLM + AdamW ({args.threads} threads, eager): {th_tps:,.0f} tokens/s, "
            f"{t_flops / 1e9:,.1f} GFLOP/s ({100 * t_flops / peak:.1f}% of the jax ceiling, "
            f"{100 * t_flops / th_peak:.1f}% of torch's own fp32 matmul, {th_peak / 1e9:,.1f} "
            f"GFLOP/s) (rounds: {', '.join(f'{r["tokens_per_sec"]:,.0f}' for r in runs['torch'])})"
        )
        print(f"ratio llm-train / torch: {jx_tps / th_tps:.2f}x (target >= 1.15x)")
        result.update(torch=runs["torch"], ratio=jx_tps / th_tps)
    if runs["maxtext"]:
        mt_tps = median("maxtext", "tokens_per_sec")
        mt_first = statistics.median(r["first_step_s"] for r in runs["maxtext"])
        print(
            f"MaxText train loop (synthetic data, no remat, no compilation cache): {mt_tps:,.0f} "
            f"tokens/s, {mt_tps * flops_tok / 1e9:,.1f} GFLOP/s "
            f"({100 * mt_tps * flops_tok / peak:.1f}% of the jax ceiling), first step {mt_first:.1f}s "
            f"after process start "
            f"(rounds: {', '.join(f'{r["tokens_per_sec"]:,.0f}' for r in runs['maxtext'])})"
        )
        print(f"ratio llm-train / MaxText: {jx_tps / mt_tps:.2f}x (target >= 1.5x)")
        result.update(maxtext=runs["maxtext"], maxtext_ratio=jx_tps / mt_tps)
    print(f"load average after: {load_average()}")
    print("RESULT " + json.dumps(result))


def run_jax_child(steps: int, overrides: list[str] | None = None) -> dict:
    """llm-train's step in a fresh process, started as `llm-train train` restarts itself (huge
    pages for the step's buffers: llm_train.host_memory)."""
    from llm_train.host_memory import huge_page_env

    argv = [__file__, "--child-jax", "--steps", str(steps)]
    argv += ["--child-overrides", json.dumps(overrides or [])]
    return run_child(argv, "llm-train run", env=huge_page_env())


if __name__ == "__main__":
    main()
