"""The fused C++ RMSNorm FFI kernels (csrc/rms_norm_kernels.cc); float32 inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def forward(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    f32 = jnp.float32
    y = jax.ffi.ffi_call(
        "llm_kernels_rms_norm_fwd",
        jax.ShapeDtypeStruct(x.shape, f32),
        vmap_method="broadcast_all",
    )(x.astype(f32), weight.astype(f32), eps=np.float32(eps))
    return y.astype(x.dtype)


def backward(
    x: jax.Array, weight: jax.Array, dy: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    f32 = jnp.float32
    dx, dw = jax.ffi.ffi_call(
        "llm_kernels_rms_norm_bwd",
        (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(weight.shape, f32)),
        vmap_method="broadcast_all",
    )(x.astype(f32), weight.astype(f32), dy.astype(f32), eps=np.float32(eps))
    return dx.astype(x.dtype), dw.astype(weight.dtype)
