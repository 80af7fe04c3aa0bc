"""Mesh and sharding helpers: the model's logical axis names -> NamedShardings on the mesh."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm_core import Config, ConfigError, length_axes
from llm_train.model import create_mesh, state_shardings

__all__ = [
    "BATCH_AXES",
    "batch_sharding",
    "build_mesh",
    "check_batch",
    "data_parallel_size",
    "state_shardings",
]

# Mesh axes the batch dimension is split over (the data-parallel degree is their product).
BATCH_AXES = ("data", "fsdp", "fsdp_transpose", "expert")


def build_mesh(cfg: Config, devices=None) -> jax.sharding.Mesh:
    """llm-core's mesh: dcn_* axes span processes (TPU slices, or one granule per CPU/GPU process)."""
    return create_mesh(cfg, devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch over the data-parallel axes, sequence over `context` and
    `sequence` (context and sequence parallelism, in the model's order)."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None
    return NamedSharding(mesh, PartitionSpec(axes, length_axes(dict(mesh.shape))))


def check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    dp = data_parallel_size(mesh)
    micro = cfg.global_batch_size // cfg.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"global_batch_size ({cfg.global_batch_size}) / grad_accum_steps "
            f"({cfg.grad_accum_steps}) = {micro} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}): change global_batch_size or the ici_*/dcn_* settings."
        )
    stages = mesh.shape.get("stage", 1)
    pipeline_micro = cfg.num_pipeline_microbatches or stages
    if stages > 1 and (micro // dp) % pipeline_micro:
        raise ConfigError(
            f"each data-parallel shard holds {micro // dp} rows of a step's batch, which do not "
            f"split into num_pipeline_microbatches ({pipeline_micro}): every microbatch needs "
            "rows on every shard. Raise global_batch_size or lower num_pipeline_microbatches."
        )
    if micro % jax.process_count():
        raise ConfigError(
            f"global_batch_size per microbatch ({micro}) is not divisible by the number of "
            f"processes ({jax.process_count()})."
        )
