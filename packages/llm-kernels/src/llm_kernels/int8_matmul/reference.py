"""Plain jnp reference: dequantize, then matmul (what XLA runs without the kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def int8_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., k] float, q [k, n] int8, scale [n] -> x @ (q * scale) [..., n] in float32."""
    return jnp.matmul(x.astype(jnp.float32), q.astype(jnp.float32) * scale.astype(jnp.float32))
