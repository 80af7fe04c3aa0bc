"""jax.numpy paged decode attention: gathers each sequence's pages, then masks by length."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """q: [B, H, D]; k/v_pages: [Hkv, P, page, D]; lengths: [B]; page_indices: [B, n] -> [B, H, D].

    The query is the last token of its sequence (position lengths[b] - 1); it sees cached keys
    j < lengths[b], and with a sliding window only those with (lengths[b] - 1) - j < window.
    sinks [H]: one more logit per head in the softmax, attending to nothing (GPT-OSS).
    """
    batch, heads, dim = q.shape
    kv_heads = k_pages.shape[0]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    # [Hkv, B, n, page, D] -> [B, Hkv, n * page, D]
    k = jnp.swapaxes(k_pages[:, page_indices], 0, 1).reshape(batch, kv_heads, -1, dim)
    v = jnp.swapaxes(v_pages[:, page_indices], 0, 1).reshape(batch, kv_heads, -1, dim)
    qg = q.reshape(batch, kv_heads, group, dim)
    s = jnp.einsum("bhgd,bhkd->bhgk", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_soft_cap is not None:
        s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
    key = jnp.arange(k.shape[2])[None, :]
    length = lengths[:, None]
    visible = key < length
    if sliding_window is not None:
        visible &= (length - 1) - key < sliding_window
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgk,bhkd->bhgd", p, v.astype(jnp.float32))
    return out.reshape(batch, heads, dim).astype(q.dtype)
