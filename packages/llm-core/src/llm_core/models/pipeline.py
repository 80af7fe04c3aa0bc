"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule with circular repeats.

A stacked segment of G layer groups is cut into S * V chunks of L = G / (S * V) consecutive groups
(S stages, V = `num_pipeline_repeats`); chunk c = v * S + s lives on stage s, so with V > 1 stage s
holds chunks s, s + S, ... (circular placement: the activations go round the stages V times). The
batch is cut into M = `num_pipeline_microbatches` microbatches (microbatch m: rows m, m + M, ...).

Everything runs in one `jax.shard_map` that is manual over `stage` only (data, FSDP and tensor stay
with the partitioner) and scans over M * V + S - 1 ticks. At tick t, stage s works on iteration
i = t - s (microbatch i % M, repeat i // M) when 0 <= i < M * V: stage 0 takes a fresh microbatch
(repeat 0) or what the last stage finished earlier (repeat > 0, kept in a buffer of M
microbatches: with M >= S it arrives before it is needed), the others take what their neighbour
sent last tick; each stage's output then moves one stage on with `ppermute`. The last stage keeps
the outputs of the last repeat. The backward is autodiff of the same program (GPipe: all forwards,
then all backwards), and the configured remat policy applies inside each tick's layer groups.

Idle ticks (the bubble, (S - 1) / (M * V + S - 1) of them) compute on zeros and are masked out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

STAGE_AXIS = "stage"
# auxiliary losses that are means over tokens: the pipeline averages them over microbatches
# (as gradient accumulation does); counts (tokens per expert, dropped) are summed
MEAN_OVER_MICROBATCHES = ("moe_lb_loss", "moe_z_loss")
# aux-loss-free routing: tokens per expert of every layer group, kept per group (each has its own
# router bias) and summed over microbatches
PER_GROUP = "router_load"


def stage_count() -> int:
    """Size of the context mesh's `stage` axis (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(STAGE_AXIS, 1)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Share of a stage's ticks spent idle: (S - 1) / (M * V + S - 1)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def run_pipelined(
    group_fn: Callable,
    state,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    *,
    microbatches: int,
    repeats: int,
    batch_axes: tuple[str, ...] = (),
):
    """The stacked groups `state` (leaves [G, ...]) applied in order to x [B, T, E] as a pipeline;
    `group_fn(group_state, x, positions, segment_ids) -> (x, aux)` runs one group. Returns
    (x, aux summed over the groups, except `router_load`: [groups, ...] per group).
    `batch_axes`: the mesh axes the batch rows are split over."""
    stages, v_count, m_count = stage_count(), repeats, microbatches
    groups = jax.tree.leaves(state)[0].shape[0]
    per_chunk = groups // (stages * v_count)
    staged = jax.tree.map(
        lambda a: a.reshape(v_count, stages, per_chunk, *a.shape[1:]), state
    )  # chunk v * S + s holds groups (v * S + s) * L ... ; stage dim sharded

    def split(a):  # [B, ...] -> [M, B / M, ...], microbatch m = rows m, m + M, ...
        return a.reshape(a.shape[0] // m_count, m_count, *a.shape[1:]).swapaxes(0, 1)

    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    mesh = jax.sharding.get_abstract_mesh()
    rows = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1)

    def constrain(a, spec):  # keep each microbatch's rows split over the batch axes
        return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, spec))

    xs, pos, segs = (constrain(split(a), PartitionSpec(None, rows)) for a in (x, positions, seg))
    ring = [(i, (i + 1) % stages) for i in range(stages)]
    iterations = m_count * v_count

    def local(staged, xs, pos, segs):
        params = jax.tree.map(lambda a: a[:, 0], staged)  # [V, L, ...]: this stage's chunks
        s = jax.lax.axis_index(STAGE_AXIS)

        def run_chunk(v, x, p, sg):
            chunk = jax.tree.map(lambda a: a[v], params)

            def one_group(x, group_state):
                return group_fn(group_state, x, p, None if segment_ids is None else sg)

            x, aux = jax.lax.scan(one_group, x, chunk)
            loads = aux.pop(PER_GROUP, {})  # [L, experts]: each layer keeps its own
            return x, jax.tree.map(lambda a: a.sum(0), aux), loads

        zero = jnp.zeros_like(xs[0])
        _, aux_shape, loads_shape = jax.eval_shape(run_chunk, 0, zero, pos[0], segs[0])
        aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
        loads0 = jax.tree.map(lambda a: jnp.zeros((v_count, *a.shape), a.dtype), loads_shape)

        def tick(carry, t):
            received, buf, outs, aux_sum, loads_sum = carry
            i = t - s
            valid = (i >= 0) & (i < iterations)
            ic = jnp.clip(i, 0, iterations - 1)
            v, m = ic // m_count, ic % m_count
            first_in = jnp.where(v == 0, xs[m], buf[m])
            y, aux, loads = run_chunk(v, jnp.where(s == 0, first_in, received), pos[m], segs[m])
            last = valid & (s == stages - 1) & (v == v_count - 1)
            outs = outs.at[m].set(jnp.where(last, y, outs[m]))
            aux_sum = jax.tree.map(lambda acc, a: acc + jnp.where(valid, a, 0), aux_sum, aux)
            loads_sum = jax.tree.map(
                lambda acc, a: acc.at[v].add(jnp.where(valid, a, 0)), loads_sum, loads
            )
            received = jax.lax.ppermute(y, STAGE_AXIS, ring)
            # stage 0 keeps what the last stage finished this tick (iteration t - S + 1)
            j = t - (stages - 1)
            jm = jnp.clip(j, 0, iterations - 1) % m_count
            keep = (s == 0) & (j >= 0) & (j < iterations)
            buf = buf.at[jm].set(jnp.where(keep, received, buf[jm]))
            return (received, buf, outs, aux_sum, loads_sum), None

        init = (zero, jnp.zeros_like(xs), jnp.zeros_like(xs), aux0, loads0)
        ticks = jnp.arange(iterations + stages - 1)
        (_, _, outs, aux_sum, loads_sum), _ = jax.lax.scan(tick, init, ticks)
        # a stage axis: the caller reads the last stage's outputs, sums the aux over stages and
        # lays the per-group loads out as [V, S, L, ...] (the groups' order)
        loads_sum = jax.tree.map(lambda a: a[:, None], loads_sum)
        return outs[None], jax.tree.map(lambda a: a[None], aux_sum), loads_sum

    stage_spec = PartitionSpec(None, STAGE_AXIS)
    outs, aux, loads = jax.shard_map(
        local,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(jax.tree.map(lambda _: stage_spec, staged), PartitionSpec(), PartitionSpec(),
                  PartitionSpec()),
        out_specs=(PartitionSpec(STAGE_AXIS), PartitionSpec(STAGE_AXIS), stage_spec),
        axis_names={STAGE_AXIS},
        check_vma=False,
    )(staged, xs, pos, segs)  # fmt: skip
    out = constrain(outs[stages - 1], PartitionSpec(None, rows)).swapaxes(0, 1).reshape(x.shape)
    aux = {k: a.sum(0) / (m_count if k in MEAN_OVER_MICROBATCHES else 1) for k, a in aux.items()}
    if loads:  # [V, S, L, experts] -> [groups, experts], like the stacked router biases
        aux[PER_GROUP] = jax.tree.map(lambda a: a.reshape(groups, *a.shape[3:]), loads)
    return out, aux
