"""Expert parallelism: the experts of a MoE layer split over the `expert` mesh axis.

When is it used: when the model is traced under a context mesh (`jax.set_mesh(mesh)` around the
jit, or `jax.sharding.use_abstract_mesh` inside it, as llm-train's `Steps` does) whose `expert` axis
has more than one device. `plan` is the one place that decides; without such a mesh (one device,
serving, plain `jax.jit`) the MoE layer runs its single-program code and XLA partitions it.

The routing (router matmul, top-k, aux losses) stays in ordinary SPMD code. Dispatch, the expert
FFN and the return run in one `jax.shard_map`:

- Tokens [T, D] and their expert ids [T, k] are split over the token axes: the batch axes of the
  sharding rules present in the mesh (they include `expert`), then every other mesh axis larger
  than 1 (`tensor`, ...), as far as T divides; so each device routes distinct tokens. The expert
  weights are split over `expert` only (in_specs P('expert', None, None)): XLA all-gathers their
  fsdp / tensor shards before the shard_map. Each device holds E / EP local experts.
- Each device packs its assignments into a send buffer [EP, C, D]: slot j of row s holds its j-th
  assignment (in token order: token-major, then its k choices) bound for shard s, with the local
  expert id beside it (E / EP marks an empty slot). `jax.lax.all_to_all` over `expert` swaps the
  rows, the receiver sorts the EP * C rows by local expert and runs `sorted_expert_ffn` on them
  (empty slots masked to zero, so they add neither to outputs nor to gradients), and a second
  all_to_all sends the results back to the slots they came from. The caller combines the [T, k, D]
  results with the router weights as on one device.

Capacity C per (source, destination) pair: buffers have fixed shapes, since `ragged_all_to_all`
is not implemented on XLA:CPU.
- `moe_capacity_factor: null` (dropless): C = t * min(k, E / EP) for t local tokens, the most a
  device can ever send to one shard (a token's k experts are distinct, at most E / EP of them on a
  shard), so nothing is dropped.
- `moe_capacity_factor: c`: C = ceil(c * t * k / EP) (at least 1, at most the dropless C).
  Drop rule: the assignments a device sends to one destination shard beyond its C slots, in token
  order, are dropped. A dropped assignment adds nothing to its token's output (as on one device,
  a token with every assignment dropped passes on the residual alone) and is counted in
  `moe_dropped`. This is a per (source device, destination shard) limit, not the per-expert limit
  of the one-device capacity path, so with drops the two give different outputs.

Limits: the dropless buffers are up to EP times the average traffic (a ragged all-to-all would
remove the padding on TPU/GPU); the expert weights are whole per expert inside the shard_map (no
tensor parallelism inside an expert); when T does not split over the batch axes up to `expert`,
the layer falls back to the single-program path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from llm_core.layers.experts import ExpertWeights, sorted_expert_ffn
from llm_core.layers.qat import ExpertQuantization

EXPERT_AXIS = "expert"


def batch_axes(rules: Sequence[Sequence]) -> tuple[str, ...]:
    """The mesh axes the logical `batch` axis maps to in a logical-axis rules table."""
    for name, axes in rules:
        if name == "batch":
            return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    return ()


@dataclass(frozen=True)
class ExpertParallel:
    """How one MoE call is split: the context mesh, the token axes and the expert-axis size."""

    mesh: jax.sharding.AbstractMesh
    token_axes: tuple[str, ...]
    ep: int

    def __call__(
        self,
        tokens: jax.Array,
        experts: jax.Array,
        weights: ExpertWeights,
        act: Callable,
        method: str,
        capacity_factor: float | None,
        quant: ExpertQuantization | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """tokens [T, D], expert ids [T, k], stacked weights -> ([T, k, D] outputs, number of
        dropped assignments)."""
        t, k = experts.shape
        t_local = t // math.prod(self.mesh.shape[a] for a in self.token_axes)
        e_local = weights.gate.shape[0] // self.ep
        capacity = dispatch_capacity(t_local, k, self.ep, e_local, capacity_factor)
        tok = PartitionSpec(self.token_axes)
        exp = PartitionSpec(EXPERT_AXIS)
        body = partial(
            _dispatch_and_compute,
            ep=self.ep,
            capacity=capacity,
            act=act,
            method=method,
            quant=quant,
            token_axes=self.token_axes,
        )
        manual = _manual_axes(self.mesh)  # inside pipeline stages: the rest become manual here
        free = {"axis_names": set(self.mesh.axis_names) - manual} if manual else {}
        run = jax.shard_map(
            body,
            mesh=self.mesh,
            **free,
            in_specs=(tok, tok, jax.tree.map(lambda _: exp, weights)),
            out_specs=(tok, PartitionSpec()),
            # custom calls inside (the grouped_matmul FFI kernel's custom_vjp) carry no
            # varying-axis types; the boundary transpose still sums weight gradients over the
            # token axes the weights are replicated on (tested against one device)
            check_vma=False,
        )
        return run(tokens, experts, weights)


def _manual_axes(mesh) -> set[str]:
    return {
        a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Manual
    }


def plan(
    num_tokens: int, num_experts: int, rules_batch_axes: Sequence[str]
) -> ExpertParallel | None:
    """The expert-parallel split for a MoE call, or None for the single-program path: no context
    mesh, an `expert` axis of size 1 (or already manual: inside another shard_map; other manual
    axes, such as pipeline stages, are left out of the token split), experts not
    divisible by it, or too few tokens to give every expert shard its own."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) <= 1:
        return None
    manual = _manual_axes(mesh)  # inside another shard_map (pipeline stages): off limits
    if EXPERT_AXIS in manual:
        return None
    ep = mesh.shape[EXPERT_AXIS]
    if num_experts % ep:
        return None
    present = [a for a in rules_batch_axes if mesh.shape.get(a, 1) > 1 and a not in manual]
    candidates = present + [
        a for a, n in mesh.shape.items() if n > 1 and a not in present and a not in manual
    ]
    axes, size = [], 1
    for a in candidates:  # the longest prefix of candidates whose size divides the tokens
        if num_tokens % (size * mesh.shape[a]):
            break
        axes.append(a)
        size *= mesh.shape[a]
    if EXPERT_AXIS not in axes:
        return None
    return ExpertParallel(mesh, tuple(axes), ep)


def dispatch_capacity(
    t_local: int, k: int, ep: int, e_local: int, capacity_factor: float | None
) -> int:
    """Slots per (source, destination shard) pair; see the module docstring."""
    never_drops = t_local * min(k, e_local)
    if capacity_factor is None:
        return never_drops
    return max(1, min(never_drops, math.ceil(capacity_factor * t_local * k / ep)))


def _all_to_all(x: jax.Array) -> jax.Array:
    """Row s of [EP, ...] goes to expert shard s; row s of the result came from shard s."""
    return jax.lax.all_to_all(x, EXPERT_AXIS, 0, 0, tiled=True)


def _dispatch_and_compute(
    x, experts, w: ExpertWeights, *, ep, capacity, act, method, quant, token_axes
):
    """Per device: local tokens [t, D], expert ids [t, k], local expert weights [E / EP, ...]."""
    t, k = experts.shape
    d, e_local = x.shape[-1], w.gate.shape[0]
    flat = experts.reshape(-1)  # token order: token-major, then the k choices
    dest = flat // e_local
    onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
    slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]
    keep = slot < capacity
    slot = jnp.where(keep, slot, capacity)  # out of range: dropped by mode="drop"
    send = (
        jnp.zeros((ep, capacity, d), x.dtype)
        .at[dest, slot]
        .set(jnp.repeat(x, k, axis=0), mode="drop")
    )
    send_ids = jnp.full((ep, capacity), e_local, jnp.int32)
    send_ids = send_ids.at[dest, slot].set(flat % e_local, mode="drop")
    rows = _local_experts(
        _all_to_all(send).reshape(ep * capacity, d),
        _all_to_all(send_ids).reshape(-1),
        w,
        act,
        method,
        quant,
    )
    back = _all_to_all(rows.reshape(ep, capacity, d))
    y = back.at[dest, slot].get(mode="fill", fill_value=0)
    dropped = jax.lax.psum(jnp.sum(~keep).astype(jnp.float32), token_axes)
    return y.reshape(t, k, d), dropped


def _local_experts(rows, ids, w: ExpertWeights, act, method, quant=None):
    """Received rows [N, D] with local expert ids [N] (E_local: empty slot) -> [N, D], in the
    received order; empty slots give zeros."""
    e_local = w.gate.shape[0]
    order = jnp.argsort(ids, stable=True)  # empty slots last
    sorted_ids = ids[order]
    sizes = jnp.zeros((e_local,), jnp.int32).at[ids].add(1, mode="drop")
    ys = sorted_expert_ffn(
        rows[order], jnp.minimum(sorted_ids, e_local - 1), sizes, w, act, method, quant
    )
    ys = jnp.where((sorted_ids < e_local)[:, None], ys, 0)
    return jnp.zeros_like(ys).at[order].set(ys)
