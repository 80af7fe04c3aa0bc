"""Grouped matmul for GPUs: Pallas kernels in the Triton-lowering style.

gmm: one program per (m tile, n tile). The wrapper computes, per m tile, the range of groups whose
rows intersect it; the program loops over those groups (fori_loop with dynamic bounds), runs the k
loop against that group's rhs and keeps the rows of the group, so rows past the last group stay 0.
tgmm: one program per (group, k tile, n tile) looping over the row tiles of its group, with rows
of other groups masked to zero. Block sizes are powers of two (Triton) and at least 16 (tl.dot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
# (m, k, n) block sizes: powers of two; a smaller dimension gets the next power of two >= 16.
TILING: tuple[int, int, int] = (64, 32, 64)
_NN = (((1,), (0,)), ((), ()))  # [bm, bk] @ [bk, bn]
_NT = (((1,), (1,)), ((), ()))  # [bm, bk] @ [bn, bk]^T
_TN = (((0,), (0,)), ((), ()))  # [bm, bk]^T @ [bm, bn]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(dim: int, default: int) -> int:
    return min(default, max(16, 1 << max(dim - 1, 0).bit_length()))


def _blocks(m: int, k: int, n: int) -> tuple[int, int, int]:
    return tuple(_block(d, t) for d, t in zip((m, k, n), TILING))  # type: ignore[return-value]


def _pad(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _offsets(group_sizes: jax.Array, m: int) -> jax.Array:
    """[g + 1] row offsets of the groups, cut at m (a group past m is empty)."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    return jnp.concatenate([jnp.zeros(1, jnp.int32), ends])


def _row_mask(row0, rows: int, start, end) -> jax.Array:
    idx = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    return (idx >= start) & (idx < end)


def _gmm_kernel(off_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, bk, nk, transpose_rhs):
    bm, bn = out_ref.shape
    i = pl.program_id(0)
    row0 = i * bm

    def product(gi):
        def k_step(kk, acc):
            k0 = pl.multiple_of(kk * bk, bk)
            x = lhs_ref[:, pl.ds(k0, bk)]
            if transpose_rhs:
                w, dims = rhs_ref[gi, :, pl.ds(k0, bk)], _NT
            else:
                w, dims = rhs_ref[gi, pl.ds(k0, bk), :], _NN
            return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=F32)

        return jax.lax.fori_loop(0, nk, k_step, jnp.zeros((bm, bn), F32))

    def group(gi, out):
        start, end = off_ref[gi], off_ref[gi + 1]
        # An empty group between two others in this tile costs no k loop.
        acc = jax.lax.cond(end > start, product, lambda _: jnp.zeros((bm, bn), F32), gi)
        return jnp.where(_row_mask(row0, bm, start, end), acc, out)

    out = jax.lax.fori_loop(lo_ref[i], hi_ref[i], group, jnp.zeros((bm, bn), F32))
    out_ref[...] = out.astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, interpret: bool) -> jax.Array:
    """lhs [m, k] @ rhs[group of row] ([g, k, n], or [g, n, k] with transpose_rhs) -> [m, n]."""
    (m, k), g = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0 or g == 0:
        return jnp.zeros((m, n), out_dtype)
    bm, bk, bn = _blocks(m, k, n)
    mp, kp, np_ = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    lhs = _pad(lhs.astype(dtype), (mp, kp))
    rhs = _pad(rhs.astype(dtype), (g, np_, kp) if transpose_rhs else (g, kp, np_))
    off = _offsets(group_sizes, m)
    # Groups intersecting m tile t: the first one ending after its first row, up to the last one
    # starting before its end.
    row0 = jnp.arange(mp // bm, dtype=jnp.int32) * bm
    lo = jnp.searchsorted(off[1:], row0, side="right").astype(jnp.int32)
    hi = jnp.minimum(jnp.searchsorted(off[1:-1], row0 + bm, side="left") + 1, g)
    hi = jnp.maximum(hi.astype(jnp.int32), lo)
    rhs_spec = (
        pl.BlockSpec((g, bn, kp), lambda i, j: (0, j, 0))
        if transpose_rhs
        else pl.BlockSpec((g, kp, bn), lambda i, j: (0, 0, j))
    )
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, bk=bk, nk=kp // bk, transpose_rhs=transpose_rhs),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((g + 1,), lambda i, j: (0,)),
            pl.BlockSpec((mp // bm,), lambda i, j: (0,)),
            pl.BlockSpec((mp // bm,), lambda i, j: (0,)),
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            rhs_spec,
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=interpret,
    )(off, lo, hi, lhs, rhs)
    return out[:m, :n]


def _tgmm_kernel(off_ref, lhs_ref, dout_ref, out_ref, *, bm: int):
    gi = pl.program_id(0)
    start, end = off_ref[gi], off_ref[gi + 1]

    def step(t, acc):
        r0 = pl.multiple_of(t * bm, bm)
        mine = _row_mask(r0, bm, start, end)  # rows of the neighbouring groups contribute nothing
        x = jnp.where(mine, lhs_ref[pl.ds(r0, bm), :], jnp.zeros((), lhs_ref.dtype))
        dy = jnp.where(mine, dout_ref[pl.ds(r0, bm), :], jnp.zeros((), dout_ref.dtype))
        return acc + jax.lax.dot_general(x, dy, _TN, preferred_element_type=F32)

    lo = start // bm
    hi = jnp.where(end > start, (end + bm - 1) // bm, lo)  # an empty group writes zeros
    acc = jax.lax.fori_loop(lo, hi, step, jnp.zeros(out_ref.shape, F32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, out_dtype, interpret: bool) -> jax.Array:
    """out[i] = lhs[rows of group i]^T @ dout[rows of group i]: [m, k], [m, n] -> [g, k, n]."""
    (m, k), n, g = lhs.shape, dout.shape[1], group_sizes.shape[0]
    if m == 0 or g == 0:
        return jnp.zeros((g, k, n), out_dtype)
    bm, bk, bn = _blocks(m, k, n)
    mp, kp, np_ = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
    dtype = jnp.result_type(lhs.dtype, dout.dtype)
    lhs, dout = _pad(lhs.astype(dtype), (mp, kp)), _pad(dout.astype(dtype), (mp, np_))
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm),
        grid=(g, kp // bk, np_ // bn),
        in_specs=[
            pl.BlockSpec((g + 1,), lambda gi, i, j: (0,)),
            pl.BlockSpec((mp, bk), lambda gi, i, j: (0, i)),
            pl.BlockSpec((mp, bn), lambda gi, i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((None, bk, bn), lambda gi, i, j: (gi, i, j)),
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        interpret=interpret,
    )(_offsets(group_sizes, m), lhs, dout)
    return out[:, :k, :n]
