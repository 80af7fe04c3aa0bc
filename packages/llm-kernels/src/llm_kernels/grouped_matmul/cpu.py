"""The C++ grouped matmul FFI kernels (csrc/gmm_kernels.cc); float32 inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, interpret: bool) -> jax.Array:
    del interpret
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = jax.ffi.ffi_call(
        "llm_kernels_gmm",
        jax.ShapeDtypeStruct((lhs.shape[0], n), F32),
        vmap_method="sequential",
    )(lhs.astype(F32), rhs.astype(F32), group_sizes, transpose_rhs=bool(transpose_rhs))
    return out.astype(out_dtype)


def tgmm(lhs, dout, group_sizes, *, out_dtype, interpret: bool) -> jax.Array:
    del interpret
    out = jax.ffi.ffi_call(
        "llm_kernels_tgmm",
        jax.ShapeDtypeStruct((group_sizes.shape[0], lhs.shape[1], dout.shape[1]), F32),
        vmap_method="sequential",
    )(lhs.astype(F32), dout.astype(F32), group_sizes)
    return out.astype(out_dtype)
