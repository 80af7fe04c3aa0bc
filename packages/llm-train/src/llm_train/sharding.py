"""Mesh and sharding helpers: the model's logical axis names -> NamedShardings on the mesh."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llm_core import Config, ConfigError
from llm_train.model import create_mesh, logical_sharding

# Mesh axes the batch dimension is split over (the data-parallel degree is their product).
BATCH_AXES = ("data", "fsdp", "fsdp_transpose", "expert")


def build_mesh(cfg: Config, devices=None) -> jax.sharding.Mesh:
    """llm-core's mesh: dcn_* axes span processes (TPU slices, or one granule per CPU/GPU process)."""
    return create_mesh(cfg, devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch over the data-parallel axes, sequence over `sequence`."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None
    seq = "sequence" if mesh.shape.get("sequence", 1) > 1 else None
    return NamedSharding(mesh, PartitionSpec(axes, seq))


def _fits(shape, spec: PartitionSpec, mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (tiny test models), keep the rest."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
        keep, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return PartitionSpec(*out)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, cfg: Config):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer state) and plain arrays.

    Variables carry logical axis names; they go through `cfg.logical_axis_rules`. Plain leaves
    (step counters, RNG keys) are replicated."""
    specs = nnx.get_partition_spec(abstract_state)

    def one(spec, leaf):
        if not isinstance(spec, PartitionSpec) or not hasattr(leaf, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        mesh_spec = logical_sharding(mesh, cfg, tuple(spec)).spec
        return NamedSharding(mesh, _fits(leaf.shape, mesh_spec, mesh))

    return jax.tree.map(one, specs, abstract_state, is_leaf=lambda x: isinstance(x, PartitionSpec))


def check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    dp = data_parallel_size(mesh)
    micro = cfg.global_batch_size // cfg.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"global_batch_size ({cfg.global_batch_size}) / grad_accum_steps "
            f"({cfg.grad_accum_steps}) = {micro} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}): change global_batch_size or the ici_*/dcn_* settings."
        )
    if micro % jax.process_count():
        raise ConfigError(
            f"global_batch_size per microbatch ({micro}) is not divisible by the number of "
            f"processes ({jax.process_count()})."
        )
