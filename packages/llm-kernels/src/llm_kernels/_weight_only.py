"""The CPU entry shared by the weight-only matmul kernels (int8, int4): one FFI call over rows,
vmap over x folded into the rows, and a custom_vjp whose gradient is for x only (quantized weights
are frozen wherever they are used: serving, QLoRA's base)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llm_kernels import _ffi
from llm_kernels._platform import current_platform


def weight_only_cpu_op(target: str, dequantize: Callable) -> Callable:
    """(x2 [m, k], q, scale) -> [m, n] float32 through the FFI `target`; `dequantize(q, scale)`
    gives the float [k, n] weights for the backward (inside the backward's program only)."""

    @jax.custom_batching.custom_vmap
    def forward(x2: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct((x2.shape[0], q.shape[1]), jnp.float32)
        )(x2.astype(jnp.float32), q, scale.astype(jnp.float32))

    @forward.def_vmap
    def forward_vmap(axis_size, in_batched, x2, q, scale):
        """vmap over x only folds the batch into the rows (one call); batched weights map one by
        one."""
        x_b, q_b, s_b = in_batched
        if not (q_b or s_b):
            x = x2 if x_b else jnp.broadcast_to(x2, (axis_size, *x2.shape))
            y = forward(x.reshape(-1, x.shape[-1]), q, scale)
            return y.reshape(axis_size, x.shape[1], q.shape[1]), True
        bcast = lambda a, b: a if b else jnp.broadcast_to(a, (axis_size, *a.shape))  # noqa: E731
        args = (bcast(x2, x_b), bcast(q, q_b), bcast(scale, s_b))
        return jax.lax.map(lambda a: forward(*a), args), True

    @jax.custom_vjp
    def op(x2: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
        return forward(x2, q, scale)

    def fwd(x2, q, scale):
        return forward(x2, q, scale), (q, scale)

    def bwd(res, dy):
        q, scale = res
        return jnp.matmul(dy, dequantize(q, scale).T), None, None

    op.defvjp(fwd, bwd)
    return op


def dispatch(
    name: str,
    x,
    q,
    scale,
    backend: str | None,
    max_rows: int,
    cpu_op: Callable,
    reference: Callable,
):
    """The public op's body: backend None takes the CPU kernel when it is built, on the CPU, for
    at most `max_rows` rows of x (decode-sized calls, where reading quantized weights wins), else
    the jnp reference; x's leading axes are folded into rows for the kernel."""
    if backend is None:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        kernels = current_platform() == "cpu" and _ffi.cpu_kernels_available()
        backend = "cpu" if kernels and rows <= max_rows else "reference"
    if backend == "reference":
        return reference(x, q, scale)
    _ffi.require_cpu_kernels(name)
    y = cpu_op(x.reshape(-1, x.shape[-1]), q, scale)
    return y.reshape(*x.shape[:-1], q.shape[1])
