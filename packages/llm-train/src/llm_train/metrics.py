"""Metrics: FLOPs per token and MFU, metrics.jsonl, TensorBoard events and the console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from llm_core import Config, matmul_params
from llm_train.quiet_imports import without

# Dense peak FLOP/s per device for known accelerators (bf16); the CPU is measured.
KNOWN_PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "h100": 989e12}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6 x the weights a token multiplies by (active experts only, from
    llm-core's eval_shape counter) + attention scores and values (forward and backward)."""
    width = cfg.resolved_head_dim  # mean of the query/key and value head widths
    if cfg.attention_kind == "mla":
        width = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
    attention = 12 * cfg.num_layers * cfg.num_heads * width * cfg.seq_len
    return 6.0 * matmul_params(cfg) + attention


_MEASURED: dict[str, float] = {}


def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on one CPU device (the ceiling MFU is measured against)."""
    if "cpu" not in _MEASURED:
        x = jax.numpy.ones((n, n), jax.numpy.float32)
        f = jax.jit(lambda a: a @ a)
        f(x).block_until_ready()
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t)
        _MEASURED["cpu"] = 2 * n**3 / best
    return _MEASURED["cpu"]


def peak_flops_per_device() -> float:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "").lower()
    for key, value in KNOWN_PEAK_FLOPS.items():
        if key in kind:
            return value
    if dev.platform == "cpu":  # simulated CPU devices share the same cores: one ceiling in all
        return measured_cpu_peak() / jax.device_count()
    return 0.0


def _import_summary_writer():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever it
    is installed (to accept torch tensors; it works without it), which took 2.5 s of a 6.3 s start
    to the first step on bench-small. Unless torch is already loaded, it is hidden for the import."""
    with without("torch"):
        from tensorboardX import SummaryWriter
    return SummaryWriter


class MetricsWriter:
    """metrics.jsonl + TensorBoard (process 0 only) and a live progress line on the console."""

    def __init__(self, out_dir: str, cfg: Config, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total, self.cfg = total_steps, cfg
        self.start_time, self.start_step = time.time(), None
        self.tty = sys.stderr.isatty()
        path = os.path.join(out_dir, "metrics.jsonl")
        self.jsonl = open(path, "a") if self.enabled else None  # noqa: SIM115 - closed in close()
        self.tb = None
        if self.enabled and cfg.tensorboard:
            try:
                summary_writer = _import_summary_writer()
                self.tb = summary_writer(os.path.join(out_dir, "tensorboard"))
            except ImportError:  # pragma: no cover
                print("tensorboardX is not installed: no TensorBoard events.", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {
            k: (float(v) if isinstance(v, np.floating | np.ndarray) else v)
            for k, v in record.items()
        }
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])

    def progress(self, record: dict) -> None:
        if not (self.enabled and self.cfg.console_progress):
            return
        step = record["step"]
        if self.start_step is None:
            self.start_step, self.start_time = step, time.time()
        done = step - self.start_step
        rate = done / max(time.time() - self.start_time, 1e-9) if done else 0.0
        eta = (self.total - step) / rate if rate else float("nan")
        eta_s = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = (
            f"step {step}/{self.total} | loss {record['loss']:.4f} | "
            f"{record['tokens_per_sec']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}% | ETA {eta_s}"
        )
        if self.tty:
            end = "\n" if step >= self.total else ""
            print("\r" + line.ljust(100), end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                print(file=sys.stderr)
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
