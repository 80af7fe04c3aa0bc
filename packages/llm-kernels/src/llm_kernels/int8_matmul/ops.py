"""Public int8_matmul: validation, backend choice, and a custom_vjp (gradient for x only: the
quantized weights are frozen wherever they are used, in serving and as QLoRA's base).

On the CPU the C++ kernel (csrc/int8_matmul_kernels.cc) widens int8 weight segments in registers
and reads 1 byte per weight; XLA's own program for the same jnp code first writes a float32 copy
of the weights (benchmarks/kernels.py measures both). Elsewhere the reference runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_kernels import _ffi
from llm_kernels._platform import current_platform
from llm_kernels.int8_matmul.reference import int8_matmul_reference

BACKENDS = ("reference", "cpu")
# benchmarks/kernels.py (AMD EPYC, 2 cores): the kernel wins up to ~16 rows of x (decode batches;
# 29x on a [512, 32000] head at one row), XLA's dequantize-then-GEMM from ~32 rows on 1408-wide
# weights (prefill), so the default takes the kernel for at most this many rows
CPU_MAX_ROWS = 16


@jax.custom_batching.custom_vmap
def _cpu_forward(x2: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(
        "llm_kernels_int8_matmul",
        jax.ShapeDtypeStruct((x2.shape[0], q.shape[1]), jnp.float32),
    )(x2.astype(jnp.float32), q, scale.astype(jnp.float32))


@_cpu_forward.def_vmap
def _cpu_forward_vmap(axis_size, in_batched, x2, q, scale):
    """vmap over x only folds the batch into the rows (one call); batched weights map one by one."""
    x_b, q_b, s_b = in_batched
    if not (q_b or s_b):
        x = x2 if x_b else jnp.broadcast_to(x2, (axis_size, *x2.shape))
        y = _cpu_forward(x.reshape(-1, x.shape[-1]), q, scale)
        return y.reshape(axis_size, x.shape[1], q.shape[1]), True
    bcast = lambda a, b: a if b else jnp.broadcast_to(a, (axis_size, *a.shape))  # noqa: E731
    args = (bcast(x2, x_b), bcast(q, q_b), bcast(scale, s_b))
    return jax.lax.map(lambda a: _cpu_forward(*a), args), True


@jax.custom_vjp
def _int8_matmul_cpu(x2: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    return _cpu_forward(x2, q, scale)


def _fwd(x2, q, scale):
    return _cpu_forward(x2, q, scale), (q, scale)


def _bwd(res, dy):
    q, scale = res
    # d x = (dy * scale) q^T: the float copy of q lives only inside the backward's program
    dx = jnp.matmul(dy * scale.astype(jnp.float32), q.astype(jnp.float32).T)
    return dx, None, None


_int8_matmul_cpu.defvjp(_fwd, _bwd)


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
    if backend is None:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        kernels = current_platform() == "cpu" and _ffi.cpu_kernels_available()
        backend = "cpu" if kernels and rows <= CPU_MAX_ROWS else "reference"
    if backend == "reference":
        return int8_matmul_reference(x, q, scale)
    _ffi.require_cpu_kernels("int8_matmul")
    lead = x.shape[:-1]
    y = _int8_matmul_cpu(x.reshape(-1, x.shape[-1]), q, scale)
    return y.reshape(*lead, q.shape[1])
