"""Contiguous KV cache: one [B, max_len] slab of keys and values per layer.

A token at position p writes its K/V at index p and attends to indices <= p; positions >= max_len are
dropped (use that for padding tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [num_layers, B, max_len, kv_heads, head_dim]
    v: jax.Array

    @classmethod
    def init(cls, cfg, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (
            cfg.num_layers,
            batch_size,
            max_len,
            cfg.resolved_num_kv_heads,
            cfg.resolved_head_dim,
        )
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def write_layer(cache_k, cache_v, k, v, positions):
    """Scatter new K/V [B, T, K, D] into one layer's cache [B, L, K, D] at `positions` [B, T]."""
    batch = jnp.arange(k.shape[0])[:, None]
    cache_k = cache_k.at[batch, positions].set(k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[batch, positions].set(v.astype(cache_v.dtype), mode="drop")
    return cache_k, cache_v
