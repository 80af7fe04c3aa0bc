"""The pre-training loop: resume, train, log, eval, checkpoint, stop cleanly on signals."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from llm_core import Config
from llm_train import distributed, init_from
from llm_train.checkpoint import Checkpointer
from llm_train.data.pipeline import Data
from llm_train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from llm_train.optim import make_optimizer, make_schedule
from llm_train.sharding import build_mesh, check_batch
from llm_train.start_up import resume_gc
from llm_train.step import Steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: str
    first_step: int
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    eval_losses: dict[int, float] = field(default_factory=dict)
    rewards: dict[int, float] = field(default_factory=dict)  # GRPO: mean reward per round
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # every eval metric
    stopped_by_signal: bool = False


def run_dir(cfg: Config) -> str:
    return os.path.join(cfg.base_output_dir, cfg.run_name)


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.raised, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def any_process(self, out_of_time: bool = False) -> tuple[bool, bool]:
        """(a signal reached some process, some process ran out of time): every process agrees."""
        if jax.process_count() == 1:
            return self.raised, out_of_time
        local = np.array([int(self.raised), int(out_of_time)], np.int32)
        flags = multihost_utils.process_allgather(local).reshape(-1, 2).max(axis=0)
        return bool(flags[0]), bool(flags[1])

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _global_batch(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _save_config(cfg: Config, out_dir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "config.yml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def enable_compilation_cache(cfg: Config) -> str | None:
    """Turn on JAX's persistent compilation cache (see `compilation_cache_dir`); returns its path."""
    path = cfg.compilation_cache_dir
    if not path:
        return None
    if path == "auto":
        path = os.path.join(cfg.base_output_dir, ".jax_cache")
    path = os.path.abspath(path)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # the cache binds its folder at the first compile
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


def train(
    cfg: Config, max_steps: int | None = None, time_limit_s: float | None = None
) -> TrainResult:
    """Train to `cfg.steps`, resuming if possible; stop early after `max_steps` steps or
    `time_limit_s` seconds in this call (a checkpoint is saved either way). objective=grpo runs
    the rollout loop of `llm_train.rl` instead."""
    if cfg.objective == "grpo":
        from llm_train.rl import train_rl

        return train_rl(cfg, max_steps)
    distributed.initialize(cfg)
    enable_compilation_cache(cfg)
    out_dir = run_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    mesh = build_mesh(cfg)
    check_batch(cfg, mesh)
    steps = Steps(cfg, mesh, make_optimizer(cfg))
    steps.start_compile()  # overlaps with data set-up and state creation / restore
    # one compiled program for the logged learning rate: evaluated op by op, the schedule's
    # dozen scalar ops each compiled on the first log line (~0.2 s of start-up)
    schedule = jax.jit(make_schedule(cfg))
    data = Data(cfg)
    ckpt = Checkpointer(
        os.path.join(out_dir, "checkpoints"), cfg.keep_checkpoints, cfg.async_checkpointing
    )
    writer = MetricsWriter(out_dir, cfg, cfg.steps)
    _save_config(cfg, out_dir)

    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(steps.abstract_with_sharding(), latest)
        if data_state is not None:
            data.set_state(data_state)
        writer.message(f"Resumed from {ckpt.directory} step {latest}.")
    elif cfg.init_from:
        state = init_from.state_from(steps, cfg)
        writer.message(f"Initialised the parameters from {cfg.init_from}.")
    else:
        state = steps.init()
    if data.skipped_records:
        writer.message(
            f"Skipped {len(data.skipped_records)} bad records (skip_bad_records); first: "
            f"{data.skipped_records[0]}"
        )
    start = int(jax.device_get(state["step"]))
    end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    result = TrainResult(out_dir, start, start)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    flops_tok = flops_per_token(cfg)
    peak = None  # measured at the first log line: on the CPU a matmul is timed, which must not
    # share the cores with the train step's compile
    last_saved = latest
    t0 = time.time()
    profiling = False
    try:
        with _StopFlag() as stop:
            for step in range(start, end):
                t_start = time.perf_counter()
                if step + 1 == cfg.profile_start_step:  # trace steps a..b (1-based, inclusive)
                    jax.profiler.start_trace(os.path.join(out_dir, "profile"))
                    profiling = True
                batch = _global_batch(next(data.train_iter), steps.batch_sharding)
                if step == start and (compile_s := steps.wait_compiled()) is not None:
                    writer.message(f"Compiled the train step in {compile_s:.1f}s.")
                    t_start = time.perf_counter()  # the first step's time is its own
                state, metrics = steps.run_train_step(state, batch)
                metrics = jax.device_get(metrics)
                if profiling and step + 1 >= cfg.profile_end_step:
                    jax.profiler.stop_trace()
                    profiling = False
                dt = time.perf_counter() - t_start
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    good = f"step {last_saved} in {ckpt.directory}" if last_saved else "none"
                    raise TrainingDiverged(
                        f"Loss is {loss} at step {step + 1}: training stopped. Last good "
                        f"checkpoint: {good}. Lower learning_rate or check the data."
                    )
                result.losses[step + 1], result.last_step = loss, step + 1
                if (step + 1) % max(cfg.log_every, 1) == 0 or step + 1 == end:
                    tps = tokens_per_step / dt
                    if peak is None:
                        peak = peak_flops_per_device() * jax.device_count()
                    record = {
                        "step": step + 1,
                        "loss": loss,
                        "learning_rate": float(schedule(step)),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens": float(metrics["tokens"]),
                        "step_time": dt,
                        "tokens_per_sec": tps,
                        "mfu": tps * flops_tok / peak if peak else 0.0,
                        **{
                            k: float(v)
                            for k, v in metrics.items()
                            if k.startswith(("moe_", "dpo_", "grpo_", "mtp_"))
                        },
                    }
                    writer.write(record)
                    writer.progress(record)
                if step == start:
                    resume_gc()  # start-up is over (llm_train.start_up)
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and data.has_eval():
                    ev = evaluate(steps, state, data)
                    result.eval_losses[step + 1] = ev["eval_loss"]
                    result.evals[step + 1] = ev
                    writer.write({"step": step + 1, **ev})
                    ppl = f" ppl {ev['eval_perplexity']:.2f}" if "eval_perplexity" in ev else ""
                    writer.message(f"eval step {step + 1}: loss {ev['eval_loss']:.4f}{ppl}")
                late = time_limit_s is not None and time.time() - t0 > time_limit_s
                stopping, out_of_time = stop.any_process(late)
                if out_of_time:
                    writer.message(f"Time limit of {time_limit_s:.0f}s reached at step {step + 1}.")
                    break
                if stopping or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                    ckpt.save(step + 1, state, data.get_state(), force=stopping)
                    last_saved = step + 1
                if stopping:
                    writer.message(f"Signal received: saved step {step + 1}; exiting.")
                    result.stopped_by_signal = True
                    break
        if result.last_step > start and last_saved != result.last_step:
            ckpt.save(result.last_step, state, data.get_state(), force=True)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        ckpt.close()
        writer.close()
    return result


def evaluate(steps: Steps, state, data: Data) -> dict[str, float]:
    """eval_loss (per token; per pair for DPO) and eval_perplexity; DPO adds the eval_dpo_* means."""
    nll = count = 0.0
    dpo: dict[str, float] = {}
    for batch in data.eval_batches():
        out = jax.device_get(steps.eval_step(state, _global_batch(batch, steps.batch_sharding)))
        nll, count = nll + float(out["nll"]), count + float(out["tokens"])
        for key in (k for k in out if k.startswith("dpo_")):
            dpo[key] = dpo.get(key, 0.0) + float(out[key])
    loss = nll / max(count, 1.0)
    result = {"eval_loss": loss}
    if steps.cfg.objective == "lm":  # a DPO loss has no perplexity
        result["eval_perplexity"] = math.exp(min(loss, 50.0))
    result.update({f"eval_{k}": v / max(count, 1.0) for k, v in dpo.items()})
    return result
