"""Plain jnp reference: unpack and dequantize, then matmul (what XLA runs without the kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dequantize_int4(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q uint8 [k / 2, n] (row 2p in the low nibble of byte row p, 2p + 1 in the high one),
    scale [groups, n] -> float32 weights [k, n], group g scaled by scale[g]."""
    nibbles = jnp.stack([q & 0xF, q >> 4], axis=1).astype(jnp.int8)  # [k / 2, 2, n]
    values = jnp.where(nibbles > 7, nibbles - 16, nibbles).astype(jnp.float32)
    k, n = 2 * q.shape[0], q.shape[1]
    grouped = values.reshape(scale.shape[0], -1, n) * scale.astype(jnp.float32)[:, None]
    return grouped.reshape(k, n)


def int4_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., k] float, q uint8 [k / 2, n], scale [groups, n] -> x @ W [..., n] in float32."""
    return jnp.matmul(x.astype(jnp.float32), dequantize_int4(q, scale))
