"""Public int4_matmul: validation and backend choice (the differentiable CPU op comes from
`_weight_only`).

On the CPU the C++ kernel (csrc/int4_matmul_kernels.cc) unpacks each byte row of weights in
registers and reads half a byte per weight; XLA's own program for the same jnp code first writes a
float32 copy of the weights (benchmarks/kernels.py measures both). Elsewhere the reference runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_kernels._weight_only import dispatch, weight_only_cpu_op
from llm_kernels.int4_matmul.reference import dequantize_int4, int4_matmul_reference

BACKENDS = ("reference", "cpu")
# benchmarks/kernels.py --only int4_matmul (AMD EPYC, 2 cores): the kernel wins up to this many
# rows of x (decode batches); XLA's dequantize-then-GEMM wins on prefill-sized inputs
CPU_MAX_ROWS = 16

_int4_matmul_cpu = weight_only_cpu_op("llm_kernels_int4_matmul", dequantize_int4)


def _validate(x: jax.Array, q: jax.Array, scale: jax.Array, backend: str | None) -> None:
    if q.ndim != 2 or q.dtype != jnp.uint8:
        raise ValueError(
            f"int4_matmul: q must be uint8 [k / 2, n] (two int4 per byte), got "
            f"{q.dtype}{tuple(q.shape)}"
        )
    k = 2 * q.shape[0]
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"int4_matmul: x must end in k={k}, got x.shape={tuple(x.shape)}")
    if scale.ndim != 2 or scale.shape[1] != q.shape[1] or not scale.shape[0]:
        raise ValueError(
            f"int4_matmul: scale must have shape [groups, n={q.shape[1]}], got {tuple(scale.shape)}"
        )
    if k % scale.shape[0] or (k // scale.shape[0]) % 2:
        raise ValueError(
            f"int4_matmul: {scale.shape[0]} scale groups must split k={k} into even-sized groups"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"int4_matmul: x must be floating, got x.dtype={x.dtype}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"int4_matmul: unknown backend {backend!r}; expected one of {BACKENDS}")


def int4_matmul(
    x: jax.Array, q: jax.Array, scale: jax.Array, *, backend: str | None = None
) -> jax.Array:
    """x [..., k] @ W -> [..., n] float32, W the grouped int4 weights q (uint8 [k / 2, n], two
    values per byte, low nibble first) times scale [groups, n]. Differentiable in x.

    backend: None (the C++ kernel on the CPU when compiled and x has at most CPU_MAX_ROWS rows,
    else the reference), "cpu", "reference".
    """
    _validate(x, q, scale, backend)
    return dispatch(
        "int4_matmul", x, q, scale, backend, CPU_MAX_ROWS, _int4_matmul_cpu,
        int4_matmul_reference,
    )  # fmt: skip
