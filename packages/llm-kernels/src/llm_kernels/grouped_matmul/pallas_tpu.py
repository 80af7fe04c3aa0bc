"""Grouped matmul for TPU: Mosaic Pallas kernels in the megablox (gmm / tgmm) design.

Rows of lhs are sorted by group, so a row tile holds one group or straddles a few. The wrapper turns
group_sizes into metadata (in jnp, passed by scalar prefetch): group offsets and, for each grid
"visit", the group and the m-tile it works on. A tile straddling several groups is visited once per
group in a row; each visit multiplies the whole tile and stores only the rows of its group, so
consecutive visits fill the same resident output block. The visit axis has a static length (m
tiles + groups - 1, the worst case) so that the grid does not depend on data; surplus visits do
nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
# (m, k, n) tile sizes; a dimension no larger than its tile is one full-size block (no padding).
# On a TPU a tile smaller than its dimension must be a multiple of (8, 128) (sublane, lane);
# the tests shrink TILING to 16, which only interpret mode accepts.
TILING: tuple[int, int, int] = (128, 128, 128)
# Visit flags: first visit of an m-tile (gmm) / of a group (tgmm), last visit of a group, real visit.
FIRST, LAST, VALID = 1, 2, 4
_NN = (((1,), (0,)), ((), ()))  # [tm, tk] @ [tk, tn]
_NT = (((1,), (1,)), ((), ()))  # [tm, tk] @ [tn, tk]^T


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
    return tuple(d if d <= t else t for d, t in zip((m, k, n), TILING))  # type: ignore[return-value]


def _pad(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _metadata(group_sizes: jax.Array, m: int, tm: int, tiles_m: int, *, tgmm: bool):
    """(offsets [g + 2], group id [V], m-tile id [V], flags [V]) with V = tiles_m + g - 1 visits.

    offsets[i]:offsets[i + 1] are the rows of group i, cut at m; group g is an empty sentinel.
    gmm visits every m-tile at least once (tiles past the last group with the sentinel, so their
    rows are zeroed) and skips empty groups; tgmm visits every group at least once (an empty one
    gets its zeros written) and skips tiles past the last group. Visits past those (the static
    length is the worst case) are surplus: flags lack VALID and they touch nothing.
    """
    g = group_sizes.shape[0]
    visits = tiles_m + g - 1
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    offsets = jnp.concatenate([starts, ends[-1:], ends[-1:]])
    nonempty = ends > starts
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    last_tile = jnp.where(nonempty, (ends - 1) // tm, first_tile)
    counts = jnp.where(nonempty, last_tile - first_tile + 1, 1 if tgmm else 0)
    real = jnp.sum(counts)  # visits of (group, tile) pairs, in row order
    v = jnp.arange(visits, dtype=jnp.int32)
    gid = jnp.repeat(jnp.arange(g, dtype=jnp.int32), counts, total_repeat_length=visits)
    tid = first_tile[gid] + v - (jnp.cumsum(counts) - counts)[gid]
    in_groups = v < real
    if tgmm:  # surplus visits: stay on the last group and tile, computing nothing
        gid = jnp.where(in_groups, gid, g - 1)
        tid = jnp.where(in_groups, tid, tid[jnp.maximum(real - 1, 0)])
        new = jnp.concatenate([jnp.ones(1, bool), gid[1:] != gid[:-1]])
        last = jnp.concatenate([gid[1:] != gid[:-1], jnp.ones(1, bool)])
        flags = new * FIRST + last * LAST + in_groups * VALID
    else:  # then the tiles past the last group (sentinel group), then repeat the last tile
        covered = -(-ends[-1] // tm)
        gid = jnp.where(in_groups, gid, g)
        tid = jnp.where(in_groups, tid, jnp.minimum(covered + v - real, tiles_m - 1))
        first = jnp.concatenate([jnp.ones(1, bool), tid[1:] != tid[:-1]])
        flags = first * FIRST + (v < real + tiles_m - covered) * VALID
    return offsets, gid, tid, flags.astype(jnp.int32)


def _group_rows(off_ref, gid_ref, tid_ref, v, tm: int):
    """(start, end, row0, active): the visit's group rows, its tile's first row, and whether
    they intersect."""
    gi, row0 = gid_ref[v], tid_ref[v] * tm
    start, end = off_ref[gi], off_ref[gi + 1]
    return start, end, row0, jnp.maximum(start, row0) < jnp.minimum(end, row0 + tm)


def _rows_in(start, end, row0, shape: tuple[int, int]) -> jax.Array:
    """Full-shape mask of the tile's rows in [start, end) (no i1 broadcasts for Mosaic)."""
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _gmm_kernel(
    off_ref, gid_ref, tid_ref, flag_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, dims, nk
):
    v, ki = pl.program_id(1), pl.program_id(2)
    tm = lhs_ref.shape[0]
    start, end, row0, active = _group_rows(off_ref, gid_ref, tid_ref, v, tm)

    @pl.when(ki == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(active)
    def _accumulate():
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...], rhs_ref[...], dims, preferred_element_type=F32
        )

    @pl.when(ki == nk - 1)
    def _store():
        mine = _rows_in(start, end, row0, out_ref.shape)
        acc = acc_ref[...]

        @pl.when((flag_ref[v] & FIRST) != 0)  # the tile's first visit zeroes the other rows
        def _first():
            out_ref[...] = jnp.where(mine, acc, 0.0).astype(out_ref.dtype)

        @pl.when((flag_ref[v] & FIRST) == 0)  # later visits keep what earlier ones wrote
        def _again():
            kept = out_ref[...].astype(F32)
            out_ref[...] = jnp.where(mine, acc, kept).astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, interpret: bool) -> jax.Array:
    """lhs [m, k] @ rhs[group of row] ([g, k, n], or [g, n, k] with transpose_rhs) -> [m, n]."""
    (m, k), g = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0 or g == 0:
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = _tiles(m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    lhs = _pad(lhs.astype(dtype), (mp, kp))
    rhs = _pad(rhs.astype(dtype), (g, np_, kp) if transpose_rhs else (g, kp, np_))
    meta = _metadata(group_sizes, m, tm, mp // tm, tgmm=False)
    nk = kp // tk

    def k_block(v, ki, flags):  # surplus visits stay on one block: no DMA per k step
        return jnp.where((flags[v] & VALID) != 0, ki, 0)

    def lhs_map(ni, v, ki, off, gid, tid, flags):
        return tid[v], k_block(v, ki, flags)

    def rhs_map(ni, v, ki, off, gid, tid, flags):
        gi, kb = jnp.minimum(gid[v], g - 1), k_block(v, ki, flags)  # sentinel: a real block
        return (gi, ni, kb) if transpose_rhs else (gi, kb, ni)

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, dims=_NT if transpose_rhs else _NN, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(np_ // tn, meta[1].shape[0], nk),
            in_specs=[
                pl.BlockSpec((tm, tk), lhs_map),
                pl.BlockSpec(rhs_block, rhs_map),
            ],
            out_specs=pl.BlockSpec((tm, tn), lambda ni, v, ki, off, gid, tid, fl: (tid[v], ni)),
            scratch_shapes=[pltpu.VMEM((tm, tn), F32)],
        ),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
    )(*meta, lhs, rhs)
    return out[:m, :n]


def _tgmm_kernel(off_ref, gid_ref, tid_ref, flag_ref, lhs_ref, dout_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    tm, flags = lhs_ref.shape[0], flag_ref[v]
    start, end, row0, active = _group_rows(off_ref, gid_ref, tid_ref, v, tm)

    @pl.when((flags & FIRST) != 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(active & ((flags & VALID) != 0))
    def _accumulate():
        # Rows of other groups contribute nothing; select and transpose in f32 (what every TPU
        # generation's VPU supports), multiply in the input dtype.
        x = jnp.where(_rows_in(start, end, row0, lhs_ref.shape), lhs_ref[...].astype(F32), 0.0)
        dy = jnp.where(_rows_in(start, end, row0, dout_ref.shape), dout_ref[...].astype(F32), 0.0)
        dtype = lhs_ref.dtype
        acc_ref[...] += jax.lax.dot(x.T.astype(dtype), dy.astype(dtype), preferred_element_type=F32)

    @pl.when((flags & LAST) != 0)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, out_dtype, interpret: bool) -> jax.Array:
    """out[i] = lhs[rows of group i]^T @ dout[rows of group i]: [m, k], [m, n] -> [g, k, n]."""
    (m, k), n, g = lhs.shape, dout.shape[1], group_sizes.shape[0]
    if m == 0 or g == 0:
        return jnp.zeros((g, k, n), out_dtype)
    tm, tk, tn = _tiles(m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    dtype = jnp.result_type(lhs.dtype, dout.dtype)
    lhs, dout = _pad(lhs.astype(dtype), (mp, kp)), _pad(dout.astype(dtype), (mp, np_))
    meta = _metadata(group_sizes, m, tm, mp // tm, tgmm=True)
    out = pl.pallas_call(
        _tgmm_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(np_ // tn, kp // tk, meta[1].shape[0]),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda ni, ki, v, off, gid, tid, fl: (tid[v], ki)),
                pl.BlockSpec((tm, tn), lambda ni, ki, v, off, gid, tid, fl: (tid[v], ni)),
            ],
            out_specs=pl.BlockSpec(
                (None, tk, tn), lambda ni, ki, v, off, gid, tid, fl: (gid[v], ki, ni)
            ),
            scratch_shapes=[pltpu.VMEM((tk, tn), F32)],
        ),
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(*meta, lhs, dout)
    return out[:, :k, :n]
