"""Per-block attention math shared by the Pallas TPU and GPU kernels.

Everything here works on values already loaded from refs: one [bq, D] query block against one
[bk, D] key/value block. Row statistics (m, l, lse, delta) are kept as [bq, 1] columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_kernels.flash_attention.config import AttentionConfig

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b.astype(a.dtype), _TN, preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32)


def scores(q: jax.Array, k: jax.Array, cfg: AttentionConfig) -> jax.Array:
    """Scaled (and soft-capped) float32 scores of a block, [bq, bk]."""
    s = dot_nt(q, k) * cfg.sm_scale
    if cfg.logit_soft_cap is not None:
        s = cfg.logit_soft_cap * jnp.tanh(s / cfg.logit_soft_cap)
    return s


def mask(
    q_idx: jax.Array,
    k_idx: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    cfg: AttentionConfig,
    q_len: int,
    kv_len: int,
) -> jax.Array:
    """Visibility of a block. q_idx: [bq, 1], k_idx: [1, bk] unpadded indices; q_seg: [bq, 1],
    k_seg: [1, bk]. Padded keys (k_idx >= kv_len) are never visible."""
    pos = q_idx + cfg.visible_offset(q_len, kv_len)
    visible = k_idx < kv_len
    if cfg.causal:
        visible &= k_idx <= pos
    if cfg.sliding_window is not None:
        visible &= pos - k_idx < cfg.sliding_window
    if q_seg is not None:
        visible &= q_seg == k_seg
    return visible


def block_visible(q0, q_rows: int, k0, k_cols: int, cfg: AttentionConfig, q_len: int, kv_len: int):
    """Scalar: may the block [q0, q0+q_rows) x [k0, k0+k_cols) hold any visible pair?"""
    offset = cfg.visible_offset(q_len, kv_len)
    ok = k0 < kv_len
    if cfg.causal:
        ok &= k0 <= q0 + q_rows - 1 + offset
    if cfg.sliding_window is not None:
        ok &= (q0 + offset) - (k0 + k_cols - 1) < cfg.sliding_window
    return ok


def online_softmax_step(s, visible, m_prev, l_prev, acc_prev, v):
    """One key block of the online softmax; rows with nothing visible yet stay at zero."""
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_use)  # exp(-inf) = 0 for rows that were empty
    p = jnp.exp(s - m_use)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    acc_new = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def finalize(m, denom, acc):
    """(out, lse) from the running statistics; rows with no visible key give 0 and lse=-inf."""
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    out = acc / safe
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))
    return out, lse


def backward_block(q, k, v, do, lse, delta, visible, cfg: AttentionConfig):
    """Recomputed probabilities p and score gradients ds (scale and soft-cap applied), [bq, bk]."""
    s = jnp.where(visible, scores(q, k, cfg), -jnp.inf)
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0))
    dp = dot_nt(do, v)
    ds = p * (dp - delta)
    if cfg.logit_soft_cap is not None:
        t = s / cfg.logit_soft_cap
        ds = ds * (1.0 - t * t)
    ds = jnp.where(visible, ds * cfg.sm_scale, 0.0)
    return p, ds


def pad_seq(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    """Pad axis of x up to length."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def to_heads_major(x: jax.Array, padded_len: int) -> jax.Array:
    """[B, L, H, D] -> [B, H, Lpad, D] (zero padded): the layout the Pallas kernels tile."""
    return pad_seq(jnp.swapaxes(x, 1, 2), 2, padded_len)


def from_heads_major(x: jax.Array, length: int) -> jax.Array:
    """[B, H, Lpad, D] -> [B, L, H, D]."""
    return jnp.swapaxes(x[:, :, :length], 1, 2)
