"""jax.numpy grouped matmuls: the ground truth every kernel is tested against, and the fallback.

`gmm_reference` is `jax.lax.ragged_dot`; `tgmm_reference` (the rhs gradient) masks rows by group,
which is slow (groups-times the work) but obviously right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group index of each of m sorted rows; rows past sum(group_sizes) get len(group_sizes)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m, dtype=ends.dtype), side="right")


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
) -> jax.Array:
    """lhs [m, k], rhs [g, k, n] ([g, n, k] when transpose_rhs) -> [m, n]; rows past the groups: 0."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    out = jax.lax.ragged_dot(
        lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )  # rows past sum(group_sizes) come out as zeros
    return out.astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
) -> jax.Array:
    """lhs [m, k], dout [m, n] -> [g, k, n]: out[i] = lhs[rows of i]^T @ dout[rows of i]."""
    g = group_sizes.shape[0]
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, dout.dtype)
    onehot = (group_ids(group_sizes, lhs.shape[0])[:, None] == jnp.arange(g)).astype(jnp.float32)
    out = jnp.einsum(
        "mg,mk,mn->gkn",
        onehot,
        lhs.astype(jnp.float32),
        dout.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(out_dtype)
