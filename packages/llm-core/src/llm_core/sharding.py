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


def state_shardings(state: nnx.State, mesh: Mesh, cfg: Config):
    """NamedSharding for every leaf of an nnx.State, from the params' logical axis names."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda spec: NamedSharding(
            mesh, logical_to_mesh_spec(tuple(spec), cfg.logical_axis_rules, mesh)
        ),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
