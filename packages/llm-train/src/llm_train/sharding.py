"""Mesh and sharding helpers: the model's logical axis names -> NamedShardings on the mesh."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llm_core import Config, ConfigError, resolve_mesh_shape
from llm_core.config import MESH_AXES
from llm_train.model import create_mesh, logical_sharding

# Mesh axes the batch dimension is split over (the data-parallel degree is their product).
BATCH_AXES = ("data", "fsdp", "fsdp_transpose", "expert")


def build_mesh(cfg: Config, devices=None) -> jax.sharding.Mesh:
    """llm-core's mesh; for several processes on hosts without TPU slices (CPU, GPU hosts), the
    dcn_* axes span processes (each process is one granule)."""
    all_devices = devices is None or list(devices) == list(jax.devices())
    slices = {getattr(d, "slice_index", 0) for d in jax.devices()}
    if jax.process_count() > 1 and all_devices and len(slices) < jax.process_count():
        return _process_granule_mesh(cfg)
    return create_mesh(cfg, devices=devices)


def _process_granule_mesh(cfg: Config) -> jax.sharding.Mesh:
    from jax.experimental import mesh_utils

    n, hosts = jax.device_count(), jax.process_count()
    shape = resolve_mesh_shape(cfg, n, hosts)
    no_dcn = cfg.replace(**{f"dcn_{a}_parallelism": 1 for a in MESH_AXES})
    ici = resolve_mesh_shape(no_dcn, n // hosts)
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES],
        [shape[a] // ici[a] for a in MESH_AXES],
        jax.devices(),
        process_is_granule=True,
        allow_split_physical_axes=True,
    )
    return jax.sharding.Mesh(grid, MESH_AXES)


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
