"""Mesh construction from the config and logical-axis -> mesh-axis rules."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_core.config import MESH_AXES, Config, resolve_mesh_shape


def create_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all axes in MESH_AXES; dcn_* axes span processes (hosts/slices), ici_* within one.

    Raises ConfigError, before any compile, when the parallelism settings cannot match the devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    # dcn_* axes span TPU slices (devices carry slice_index) or, on CPU/GPU hosts, processes.
    has_slices = hasattr(devices[0], "slice_index")
    if devices != list(jax.devices()):
        num_slices = 1
    elif has_slices:
        num_slices = len({d.slice_index for d in devices})
    else:
        num_slices = jax.process_count()
    shape = resolve_mesh_shape(cfg, len(devices), num_slices)
    if num_slices > 1:
        from jax.experimental import mesh_utils

        ici = resolve_mesh_shape(
            cfg.replace(**{f"dcn_{a}_parallelism": 1 for a in MESH_AXES}),
            len(devices) // num_slices,
        )
        dcn = [shape[a] // ici[a] for a in MESH_AXES]
        granule = {} if has_slices else {"process_is_granule": True}
        grid = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in MESH_AXES], dcn, devices, allow_split_physical_axes=True, **granule
        )
    else:
        grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None, rules: Sequence[Sequence], mesh: Mesh
) -> PartitionSpec:
    """Map logical names to mesh axes. Mesh axes of size 1 are dropped; a mesh axis is used once."""
    if logical_axes is None:
        return PartitionSpec()
    table = {name: (axes if isinstance(axes, list) else [axes]) for name, axes in rules}
    used: set[str] = set()
    out = []
    for name in logical_axes:
        axes = [a for a in table.get(name, []) if a and mesh.shape.get(a, 1) > 1 and a not in used]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, cfg: Config, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, cfg.logical_axis_rules, mesh))


def _fits(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (tiny test models), keep the rest."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        axes = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
        keep, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return PartitionSpec(*out)


def shard_count(size: int, logical_axis: str, rules: Sequence[Sequence], mesh: Mesh) -> int:
    """How many ways a dimension of `size` named `logical_axis` is split on `mesh`, as parameters
    are: by the rules, less the mesh axes that do not divide it."""
    entry = _fits((size,), logical_to_mesh_spec((logical_axis,), rules, mesh), mesh)[0]
    axes = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def state_shardings(state, mesh: Mesh, cfg: Config):
    """NamedSharding for every leaf of a pytree holding nnx Variables (a model's state, or a train
    state with optimizer moments) and plain arrays. Variables carry logical axis names mapped by
    `cfg.logical_axis_rules`; mesh axes that do not divide a dimension are dropped for it; plain
    leaves (step counters, RNG keys) are replicated. The one sharding helper for every package."""
    specs = nnx.get_partition_spec(state)

    def one(spec, leaf):
        if not isinstance(spec, PartitionSpec) or not hasattr(leaf, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        mesh_spec = logical_to_mesh_spec(tuple(spec), cfg.logical_axis_rules, mesh)
        return NamedSharding(mesh, _fits(leaf.shape, mesh_spec, mesh))

    return jax.tree.map(one, specs, state, is_leaf=lambda x: isinstance(x, PartitionSpec))
