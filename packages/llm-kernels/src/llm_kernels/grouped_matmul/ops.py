"""Public grouped_matmul: argument checks, backend dispatch and the custom_vjp.

Every kernel backend module provides

    gmm(lhs [m, k], rhs [g, k, n] or [g, n, k], group_sizes [g] int32, *, transpose_rhs: bool,
        out_dtype, interpret: bool) -> [m, n]
    tgmm(lhs [m, k], dout [m, n], group_sizes [g] int32, *, out_dtype, interpret: bool) -> [g, k, n]

Rows of lhs are sorted by group; rows past sum(group_sizes) give zeros (gmm) and are ignored
(tgmm). The backward of `out = gmm(lhs, rhs)` is two more grouped products (the megablox wiring):
d-lhs = gmm(dout, rhs) with the other transpose_rhs, d-rhs = tgmm(lhs, dout) ([g, k, n]) or
tgmm(dout, lhs) ([g, n, k]) when rhs is stored transposed.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from llm_kernels import _platform
from llm_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference
from llm_kernels.grouped_matmul.validation import validate_gmm_args

_KERNEL_MODULES = {
    "cpu": "llm_kernels.grouped_matmul.cpu",
    "pallas_tpu": "llm_kernels.grouped_matmul.pallas_tpu",
    "pallas_gpu": "llm_kernels.grouped_matmul.pallas_gpu",
}


class _Reference:
    """The jnp reference under the backend interface (so it can be wired like a kernel)."""

    @staticmethod
    def gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, interpret):
        del interpret
        return gmm_reference(
            lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, preferred_element_type=out_dtype
        )

    @staticmethod
    def tgmm(lhs, dout, group_sizes, *, out_dtype, interpret):
        del interpret
        return tgmm_reference(lhs, dout, group_sizes, preferred_element_type=out_dtype)


def _kernels(backend: str) -> ModuleType | type[_Reference]:
    if backend == "reference":
        return _Reference
    return importlib.import_module(_KERNEL_MODULES[backend])


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """The backend to run, or a loud error when the platform has none."""
    return _platform.resolve_backend("grouped_matmul", backend, interpret, "jax.lax.ragged_dot")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, interpret):
    return _kernels(backend).gmm(
        lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, interpret=interpret
    )


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, interpret):
    out = _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, out_dtype, backend, interpret, res, dout):
    lhs, rhs, group_sizes = res
    kernels = _kernels(backend)
    dlhs = kernels.gmm(
        dout, rhs, group_sizes, transpose_rhs=not transpose_rhs, out_dtype=lhs.dtype,
        interpret=interpret,
    )  # fmt: skip
    if transpose_rhs:  # rhs [g, n, k]: d-rhs[i] = dout_i^T lhs_i
        drhs = kernels.tgmm(dout, lhs, group_sizes, out_dtype=rhs.dtype, interpret=interpret)
    else:
        drhs = kernels.tgmm(lhs, dout, group_sizes, out_dtype=rhs.dtype, interpret=interpret)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Rows of lhs [m, k] sorted by group; rows of group i multiply rhs[i] -> [m, n]. Differentiable.

    rhs is [g, k, n], or [g, n, k] with transpose_rhs. group_sizes [g] int32 must sum to at most m
    (checked when concrete; inside jit, rows past m are never read and groups are cut at m); rows
    past sum(group_sizes) come out as zeros. The result has preferred_element_type, or the promoted
    input dtype; every backend accumulates in float32.

    backend: None picks by platform (C++ kernel on CPU, Pallas on TPU and GPU), or one of
    "reference" (jax.lax.ragged_dot), "cpu", "pallas_tpu", "pallas_gpu"; interpret=True runs a
    Pallas kernel in the interpreter (tests on CPU).
    """
    validate_gmm_args(lhs, rhs, group_sizes, transpose_rhs, backend)
    chosen = resolve_backend(backend, interpret)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    return _gmm(lhs, rhs, group_sizes, bool(transpose_rhs), out_dtype, chosen, bool(interpret))
