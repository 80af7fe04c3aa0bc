"""Public int8_matmul: validation and backend choice (the differentiable CPU op, gradient for x
only, comes from `_weight_only`).

On the CPU the C++ kernel (csrc/int8_matmul_kernels.cc) widens int8 weight segments in registers
and reads 1 byte per weight; XLA's own program for the same jnp code first writes a float32 copy
of the weights (benchmarks/kernels.py measures both). Elsewhere the reference runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_kernels._weight_only import dispatch, weight_only_cpu_op
from llm_kernels.int8_matmul.reference import int8_matmul_reference

BACKENDS = ("reference", "cpu")
# benchmarks/kernels.py (AMD EPYC, 2 cores): the kernel wins up to ~16 rows of x (decode batches;
# 29x on a [512, 32000] head at one row), XLA's dequantize-then-GEMM from ~32 rows on 1408-wide
# weights (prefill), so the default takes the kernel for at most this many rows
CPU_MAX_ROWS = 16


_int8_matmul_cpu = weight_only_cpu_op(
    "llm_kernels_int8_matmul",
    lambda q, scale: q.astype(jnp.float32) * scale.astype(jnp.float32),
)


def _validate(x: jax.Array, q: jax.Array, scale: jax.Array, backend: str | None) -> None:
    if q.ndim != 2 or q.dtype != jnp.int8:
        raise ValueError(f"int8_matmul: q must be int8 [k, n], got {q.dtype}{tuple(q.shape)}")
    if x.ndim < 1 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"int8_matmul: x must end in k={q.shape[0]}, got x.shape={tuple(x.shape)}")
    if scale.shape != (q.shape[1],):
        raise ValueError(
            f"int8_matmul: scale must have shape [n]=({q.shape[1]},), got {tuple(scale.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"int8_matmul: x must be floating, got x.dtype={x.dtype}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"int8_matmul: unknown backend {backend!r}; expected one of {BACKENDS}")


def int8_matmul(
    x: jax.Array, q: jax.Array, scale: jax.Array, *, backend: str | None = None
) -> jax.Array:
    """x [..., k] @ (q [k, n] int8 * scale [n]) -> [..., n] float32. Differentiable in x.

    backend: None (the C++ kernel on the CPU when compiled and x has at most CPU_MAX_ROWS rows,
    else the reference), "cpu", "reference".
    """
    _validate(x, q, scale, backend)
    return dispatch(
        "int8_matmul", x, q, scale, backend, CPU_MAX_ROWS, _int8_matmul_cpu,
        int8_matmul_reference,
    )  # fmt: skip
