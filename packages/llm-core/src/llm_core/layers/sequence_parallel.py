"""Sequence parallelism over the `sequence` mesh axis (Megatron-LM's, Korthikanti et al. 2022).

Between a decoder layer's matmuls (norms, residual adds, post-norms) the activations are split over
`sequence` on their length axis, so no device keeps the whole sequence's residual stream. Each
attention or feed-forward block gathers its normalised input over `sequence` (an all-gather), runs
its matmuls tensor-parallel over `tensor` x `sequence` (the default logical-axis rules split heads
and MLP columns over both) and hands back its output split over `sequence` again: the row-parallel
projection's partial sums are reduce-scattered rather than all-reduced. The two constraints below
are all the model says; the partitioner places the collectives.

With context parallelism as well, the length axis is split `context`-major (device (c, s) holds
chunk c * sequence + s), so gathering over `sequence` leaves each device its own contiguous context
chunk, as attention's context strategies expect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

SEQUENCE_AXIS = "sequence"
CONTEXT_AXIS = "context"
GATHERED = "sequence_gathered"  # checkpoint name of a block's gathered input


def sequence_size() -> int:
    """Size of the context mesh's `sequence` axis (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(SEQUENCE_AXIS, 1)


def length_axes(mesh_shape: dict) -> tuple[str, ...] | None:
    """Mesh axes a [batch, length] input's length is split over: `context`-major, then `sequence`."""
    axes = tuple(a for a in (CONTEXT_AXIS, SEQUENCE_AXIS) if mesh_shape.get(a, 1) > 1)
    return axes or None


def _constrain(x: jax.Array, batch_axes: Sequence[str], split: bool) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.ndim != 3:
        return x
    shape = dict(mesh.shape)
    sequence, context = shape.get(SEQUENCE_AXIS, 1), shape.get(CONTEXT_AXIS, 1)
    if x.shape[1] % (sequence * context):
        return x  # a decode step's few tokens: left to the partitioner
    rows = tuple(a for a in batch_axes if shape.get(a, 1) > 1)
    if x.shape[0] % math.prod(shape[a] for a in rows):
        rows = PartitionSpec.UNCONSTRAINED
    length = [CONTEXT_AXIS] if context > 1 else []
    if split and sequence > 1:
        length.append(SEQUENCE_AXIS)
    spec = PartitionSpec(rows or None, tuple(length) or None, None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def split_sequence(x: jax.Array, batch_axes: Sequence[str]) -> jax.Array:
    """[B, S, E] between matmuls: B over `batch_axes`, S over `context` and `sequence`, E whole.
    Pinned under any mesh, sequence parallel or not: left to propagation, FSDP's embed-sharded
    weights pulled the residual stream onto the embed axis (whole batch on every device)."""
    return _constrain(x, batch_axes, split=True)


def gather_sequence(x: jax.Array, batch_axes: Sequence[str]) -> jax.Array:
    """[B, S, E] entering a block's matmuls: S whole over `sequence` (still split over `context`).
    Named GATHERED, so that `remat_policy` can leave it out of the saved activations."""
    split = _constrain(x, batch_axes, split=True)  # the norm runs (and is saved) split
    if split is x or sequence_size() == 1:
        return split
    return checkpoint_name(_constrain(split, batch_axes, split=False), GATHERED)


def remat_policy(policy):
    """A layer group's checkpoint `policy` under sequence parallelism: as in Megatron-LM, the
    backward gathers a block's input again from the saved split one instead of keeping the whole
    sequence per layer (no sharding constraint's output is saved: re-applying one to its saved
    input costs nothing or the collective it stands for). Without a `sequence` axis: `policy`
    unchanged."""
    if sequence_size() == 1:
        return policy

    def saved(prim, *args, **params):  # neither the gathered input nor the constraint making it
        if params.get("name") == GATHERED or prim.name == "sharding_constraint":
            return False
        return policy(prim, *args, **params)

    return saved
