"""Argument checks of grouped_matmul, before any tracing, so a bad call names the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("reference", "cpu", "pallas_tpu", "pallas_gpu")


def validate_gmm_args(lhs, rhs, group_sizes, transpose_rhs: bool, backend: str | None) -> None:
    """ValueError naming the argument and shapes for any inconsistent call."""
    if lhs.ndim != 2:
        raise ValueError(
            f"grouped_matmul: lhs must be 2-D [m, k], got lhs.shape={tuple(lhs.shape)}"
        )
    if rhs.ndim != 3:
        raise ValueError(
            f"grouped_matmul: rhs must be 3-D [groups, k, n] ([groups, n, k] with transpose_rhs), "
            f"got rhs.shape={tuple(rhs.shape)}"
        )
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if k_rhs != lhs.shape[1]:
        layout = "[groups, n, k]" if transpose_rhs else "[groups, k, n]"
        raise ValueError(
            f"grouped_matmul: contracting dimensions differ: lhs.shape={tuple(lhs.shape)} has "
            f"k={lhs.shape[1]}, rhs.shape={tuple(rhs.shape)} as {layout} has k={k_rhs} "
            f"(transpose_rhs={transpose_rhs})"
        )
    if group_sizes.ndim != 1 or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"grouped_matmul: group_sizes must have shape [groups] = [{rhs.shape[0]}] (rhs.shape[0]), "
            f"got group_sizes.shape={tuple(group_sizes.shape)}"
        )
    if group_sizes.dtype != jnp.int32:
        raise ValueError(
            f"grouped_matmul: group_sizes must be int32, got group_sizes.dtype={group_sizes.dtype}"
        )
    for name, a in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"grouped_matmul: {name} must be floating, got {name}.dtype={a.dtype}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: unknown backend {backend!r}; expected one of {BACKENDS}")
    if not isinstance(group_sizes, jax.core.Tracer):  # concrete: the sum can be checked now
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any():
            raise ValueError(f"grouped_matmul: group_sizes must be >= 0, got {sizes.tolist()}")
        if int(sizes.sum()) > lhs.shape[0]:
            raise ValueError(
                f"grouped_matmul: sum(group_sizes) = {int(sizes.sum())} exceeds the "
                f"{lhs.shape[0]} rows of lhs"
            )
