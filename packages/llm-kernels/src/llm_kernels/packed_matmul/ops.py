"""Public packed_matmul: float32 x @ w with w packed in 32-column panels (`pack_panels`), the panels
float32 or bfloat16.

On the CPU the C++ kernel (csrc/packed_matmul_kernels.cc) streams each panel once and feeds up to 8
rows of x from registers, with the work split over XLA's intra-op thread pool. At decode's few rows
XLA:CPU's own matmul on a row-major [k, n] weight reaches about a third of the memory bandwidth;
the kernel reaches it (benchmarks/kernels.py --only packed_matmul). Differentiable in x only: the
packed weights are frozen (serving). Elsewhere the reference runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llm_kernels import _ffi
from llm_kernels._platform import current_platform
from llm_kernels.packed_matmul.reference import PANEL, packed_matmul_reference, unpack_panels

BACKENDS = ("reference", "cpu")
PANEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _packed_cpu(x2: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    target = "llm_kernels_packed_matmul" + ("_bf16" if panels.dtype == jnp.bfloat16 else "")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))(x2, panels)


def _fwd(x2, panels, n):
    return _packed_cpu(x2, panels, n), panels


def _bwd(n, panels, dy):
    return jnp.matmul(dy, unpack_panels(panels, n).astype(jnp.float32).T), None


_packed_cpu.defvjp(_fwd, _bwd)


def packed_matmul(
    x: jax.Array, panels: jax.Array, n: int, *, backend: str | None = None
) -> jax.Array:
    """x [..., k] @ w [k, n] -> [..., n] float32, with `panels` = pack_panels(w), float32 or
    bfloat16 (widened in registers: half the bytes streamed; x is float32 either way).

    backend: None (the C++ kernel on the CPU when compiled, else the reference), "cpu",
    "reference".
    """
    if panels.ndim != 3 or panels.shape[2] != PANEL or panels.dtype not in PANEL_DTYPES:
        raise ValueError(
            f"packed_matmul: panels must be float32 or bfloat16 [p, k, {PANEL}] (pack_panels), got "
            f"{panels.dtype}{tuple(panels.shape)}"
        )
    if panels.shape[0] != -(-n // PANEL):
        raise ValueError(f"packed_matmul: {panels.shape[0]} panels cannot hold n={n} columns")
    if x.ndim < 1 or x.shape[-1] != panels.shape[1]:
        raise ValueError(
            f"packed_matmul: x must end in k={panels.shape[1]}, got x.shape={tuple(x.shape)}"
        )
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"packed_matmul: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend is None:
        cpu = current_platform() == "cpu" and _ffi.cpu_kernels_available()
        backend = "cpu" if cpu else "reference"
    if backend == "reference":
        return packed_matmul_reference(x, panels, n)
    _ffi.require_cpu_kernels("packed_matmul")
    y = _packed_cpu(x.reshape(-1, x.shape[-1]).astype(jnp.float32), panels, n)
    return y.reshape(*x.shape[:-1], n)
