"""Plain jax.numpy attention with the exact semantics of every kernel: the ground truth in tests.

It materialises the [q_len, kv_len] score matrix, so memory is quadratic in sequence length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    sliding_window: int | None,
    segment_ids: jax.Array | None,
) -> jax.Array:
    """Boolean visibility mask, [batch or 1, q_len, kv_len].

    Query i sits at absolute position ``kv_len - q_len + i`` (the ends are aligned, as in decode
    with a cache); it sees key j if ``j <= pos`` (causal), ``pos - j < sliding_window`` and both
    tokens share a segment id.
    """
    pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    key = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), dtype=bool)
    if causal:
        mask &= key <= pos
    if sliding_window is not None:
        mask &= pos - key < sliding_window
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def mha_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Reference attention. q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D] -> [B, Lq, H, D]. sinks [H]:
    one more logit per head in every row's softmax, attending to nothing."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    # Grouped view instead of repeating K/V: [B, Lq, Hkv, G, D].
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    s = s.astype(jnp.float32) * scale
    if logit_soft_cap is not None:
        s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
    mask = attention_mask(
        q_len, kv_len, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids
    )[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    # Safe softmax: rows with no visible key give zeros and finite gradients.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1, 1)
        m = jnp.maximum(m, jax.lax.stop_gradient(sink))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
