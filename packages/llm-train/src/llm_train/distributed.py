"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

Settings, first found wins: the config keys `coordinator_address`, `num_processes`, `process_id`;
then $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID; then JAX's own cluster
auto-detection (Slurm, TPU VMs, Kubernetes via the GKE/JobSet variables) when
$LLM_TRAIN_AUTO_DISTRIBUTED=1. On the CPU, processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax

from llm_core import Config

_INITIALIZED = False


def settings(cfg: Config) -> dict | None:
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address and num > 1:
        return {"coordinator_address": address, "num_processes": num, "process_id": pid}
    if os.environ.get("LLM_TRAIN_AUTO_DISTRIBUTED") == "1":
        return {}
    return None


def initialize(cfg: Config) -> None:
    """Join the other processes (once); a no-op for a single-process run."""
    global _INITIALIZED
    if _INITIALIZED:
        return
    kwargs = settings(cfg)
    if kwargs is None:
        return
    if kwargs.get("process_id", 0) < 0:
        raise ValueError(
            "Multi-process run without a process id: set process_id=<n> or $JAX_PROCESS_ID."
        )
    # Only the CPU backend reads this; accelerators use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
