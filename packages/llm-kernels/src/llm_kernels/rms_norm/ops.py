"""Public rms_norm: validation, backend choice and the custom_vjp around the C++ kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llm_kernels import _ffi
from llm_kernels._platform import current_platform
from llm_kernels.rms_norm import cpu
from llm_kernels.rms_norm.reference import rms_norm_reference

BACKENDS = ("reference", "cpu")
# From benchmarks/kernels.py on the 2-core dev machine: XLA's fused jnp forward beats the C++
# forward (0.77x), while the fused C++ backward beats XLA's (fwd+bwd 1.39x). So the CPU default
# is "auto": XLA forward + C++ backward; backend="cpu" runs both C++ kernels.
CPU_DEFAULT_BACKEND = "auto"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_cpu(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return cpu.forward(x, weight, eps)


def _fwd(x, weight, eps):
    return cpu.forward(x, weight, eps), (x, weight)


def _bwd(eps, res, dy):
    x, weight = res
    return cpu.backward(x, weight, dy, eps)


_rms_norm_cpu.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_auto(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return rms_norm_reference(x, weight, eps=eps)


def _auto_fwd(x, weight, eps):
    return rms_norm_reference(x, weight, eps=eps), (x, weight)


_rms_norm_auto.defvjp(_auto_fwd, _bwd)


def _validate(x: jax.Array, weight: jax.Array, eps: float, backend: str | None) -> None:
    if x.ndim < 1 or weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape [x.shape[-1]], got x.shape={tuple(x.shape)}, "
            f"weight.shape={tuple(weight.shape)}"
        )
    for name, a in (("x", x), ("weight", weight)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"rms_norm: {name} must be floating, got {name}.dtype={a.dtype}")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"rms_norm: unknown backend {backend!r}; expected one of {BACKENDS}")


def rms_norm(
    x: jax.Array, weight: jax.Array, *, eps: float = 1e-6, backend: str | None = None
) -> jax.Array:
    """RMSNorm over the last axis, float32 inside, result in x.dtype. Differentiable.

    backend: None (CPU: XLA forward + C++ backward when compiled; else the reference),
    "cpu" (C++ forward and backward), "reference" (jnp only).
    """
    _validate(x, weight, eps, backend)
    if backend is None:
        kernels = current_platform() == "cpu" and _ffi.cpu_kernels_available()
        backend = CPU_DEFAULT_BACKEND if kernels else "reference"
    if backend == "auto":
        return _rms_norm_auto(x, weight, float(eps))
    if backend == "cpu":
        _ffi.require_cpu_kernels("rms_norm")
        return _rms_norm_cpu(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps=eps)
