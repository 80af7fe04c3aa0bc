"""jax.numpy RMSNorm: the ground truth and the fallback off the CPU kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(x: jax.Array, weight: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in float32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    rs = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * rs * weight.astype(jnp.float32)).astype(x.dtype)
