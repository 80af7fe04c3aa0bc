"""Parallelism on 8 simulated CPU devices: context parallelism at a long sequence, and the pipeline's
bubble against its formula.

1. Context parallelism: a small model (2 layers, d_model 128, 2 heads of 64, vocab 1024) trained on
   one sequence of --seq tokens (default 32768), batch 1, chunked attention. Per-device peak memory
   (the compiled train step's memory_analysis: arguments + outputs - aliased + temporaries) and
   step time (median of --repeats, after a warm-up step) for CP=8 ring, CP=8 ring with
   `context_parallel_load_balance`, CP=8 all_gather, and no context parallelism on one device.
   A layout whose simulated devices together would need more than 70% of this machine's memory
   is compiled (its peak is printed) but not run.
   The 8 simulated devices share this machine's cores, so step times compare total work (the
   ring's skipped blocks show; the load balance's evenness cannot), not a real 8-chip speed-up.
2. Pipeline bubble: PP=4 x DP=2 on bench-small-like layers (8 layers, d_model 256), microbatches of
   2 rows per data shard, M = 4 and M = 16 microbatches. Idle ticks compute on zeros here, so a
   step costs (ticks x per-tick time + the rest); the two M values give the per-tick time, and the
   measured bubble, (S - 1) x per-tick / step time, is printed beside (S - 1) / (M + S - 1).

    python benchmarks/parallel.py [--seq 32768] [--repeats 3] [--only cp|pipeline]

Run it on a quiet machine (no tests or builds alongside); it prints the CPU model and the load
average before and after.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import time

import jax
import numpy as np
from kernels import cpu_model, load_average

from llm_core import load_config
from llm_train.optim import make_optimizer
from llm_train.plan import compiled_bytes
from llm_train.sharding import build_mesh
from llm_train.step import Steps

CP_MODEL = [
    "num_layers=2", "emb_dim=128", "num_heads=2", "num_kv_heads=2", "head_dim=64", "mlp_dim=256",
    "vocab_size=1024", "global_batch_size=1", "attention_backend=chunked", "attention_chunk_size=512",
    "remat_policy=full",
]  # fmt: skip
CP_LAYOUTS = {
    "CP=8 ring": ["ici_context_parallelism=8", "context_parallel_strategy=ring"],
    "CP=8 ring, load balance": [
        "ici_context_parallelism=8", "context_parallel_strategy=ring",
        "context_parallel_load_balance=true",
    ],
    "CP=8 all_gather": ["ici_context_parallelism=8", "context_parallel_strategy=all_gather"],
    "none (one device)": [],
}  # fmt: skip
PP_MODEL = [
    "num_layers=8", "emb_dim=256", "num_heads=4", "num_kv_heads=2", "head_dim=64", "mlp_dim=704",
    "vocab_size=1024", "seq_len=128", "ici_stage_parallelism=4", "ici_data_parallelism=2",
    "ici_fsdp_parallelism=1",
]  # fmt: skip
ROWS_PER_MICROBATCH = 4  # 2 per data shard


def _steps(overrides: list[str], one_device: bool = False) -> Steps:
    common = ["ici_data_parallelism=1", "ici_fsdp_parallelism=1", "dataset_kind=synthetic"]
    cfg = load_config(None, common + overrides)
    mesh = build_mesh(cfg) if not one_device else _one_device_mesh(cfg)
    return Steps(cfg, mesh, make_optimizer(cfg))


def _one_device_mesh(cfg):
    from llm_core import create_mesh

    return create_mesh(cfg, devices=jax.devices()[:1])


def _batch(steps: Steps) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for k, spec in steps.abstract_batch().items():
        if k in ("inputs", "targets"):
            value = rng.integers(0, steps.cfg.vocab_size, spec.shape)
        elif k == "positions":
            value = np.broadcast_to(np.arange(spec.shape[1]), spec.shape)
        else:
            value = np.ones(spec.shape)
        out[k] = jax.device_put(np.asarray(value, spec.dtype), spec.sharding)
    return out


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _measure(steps: Steps, repeats: int) -> tuple[int, float | None]:
    """(compiled per-device peak bytes, median step seconds or None when the simulated devices
    together would need more than 70% of this machine's memory: compiled, not run)."""
    compiled = steps.train_step.lower(
        steps.abstract_with_sharding(), steps.abstract_batch()
    ).compile(steps.compiler_options())
    if compiled_bytes(compiled) * steps.mesh.size > 0.7 * _host_memory():
        return compiled_bytes(compiled), None
    batch = _batch(steps)
    state = steps.init()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return compiled_bytes(compiled), statistics.median(times)


def bench_context(seq: int, repeats: int) -> None:
    print(f"\ncontext parallelism, seq {seq}, batch 1 (2 layers, d_model 128), median of {repeats}")
    print(f"{'layout':<26} {'peak / device':>14} {'step':>9}")
    for name, extra in CP_LAYOUTS.items():
        steps = _steps([*CP_MODEL, f"seq_len={seq}", f"max_position_embeddings={seq}", *extra],
                       one_device=not extra)  # fmt: skip
        peak, t = _measure(steps, repeats)
        step = f"{t:8.2f}s" if t is not None else "  not run: 8 simulated devices exceed this host"
        print(f"{name:<26} {peak / 2**20:11.1f} MiB {step}")


def bench_pipeline(repeats: int) -> None:
    from llm_core import bubble_fraction

    stages = 4
    print(f"\npipeline PP={stages} x DP=2 (8 layers, d_model 256, seq 128), median of {repeats}")
    timings = {}
    for micro in (4, 16):
        over = [*PP_MODEL, f"num_pipeline_microbatches={micro}",
                f"global_batch_size={micro * ROWS_PER_MICROBATCH}"]  # fmt: skip
        _, timings[micro] = _measure(_steps(over), repeats)
    per_tick = (timings[16] - timings[4]) / (16 - 4)
    for micro, t in timings.items():
        measured = (stages - 1) * per_tick / t
        print(
            f"M={micro:2d}: step {t:6.3f}s, per tick {per_tick * 1e3:6.1f} ms, measured bubble "
            f"{measured:5.1%}, formula (S - 1) / (M + S - 1) {bubble_fraction(stages, micro):5.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=32768, help="context-parallel sequence length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["cp", "pipeline"])
    args = parser.parse_args()
    print(
        f"CPU {cpu_model()}, {jax.device_count()} simulated devices, load average {load_average()}"
    )
    if args.only in (None, "cp"):
        bench_context(args.seq, args.repeats)
    if args.only in (None, "pipeline"):
        bench_pipeline(args.repeats)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
