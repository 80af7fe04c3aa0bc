"""Argument checks that run before any tracing into a kernel, with messages naming the
argument and the shapes involved."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from llm_kernels.flash_attention.config import BACKENDS


def _shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    return f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"


def validate_attention_args(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sliding_window: int | None,
    segment_ids: jax.Array | None,
    logit_soft_cap: float | None,
    sm_scale: float | None,
    block_q: int | None,
    block_k: int | None,
    backend: str | None,
    sinks: jax.Array | None = None,
) -> None:
    """Raise ValueError for inputs no backend can handle."""
    if sinks is not None and (sinks.ndim != 1 or sinks.shape[0] != q.shape[2]):
        raise ValueError(
            f"flash_attention: sinks must be [num_heads] = [{q.shape[2]}], got "
            f"sinks.shape={tuple(sinks.shape)} ({_shapes(q, k, v)})"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"flash_attention: {name} must have rank 4 [batch, seq, heads, head_dim], "
                f"got {name}.shape={tuple(x.shape)} ({_shapes(q, k, v)})"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"flash_attention: {name} must be a floating dtype (float32, bfloat16, float16), "
                f"got {name}.dtype={x.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"flash_attention: q, k, v must share a dtype, got q.dtype={q.dtype}, "
            f"k.dtype={k.dtype}, v.dtype={v.dtype}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape, got {_shapes(q, k, v)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            f"flash_attention: batch mismatch: q batch {q.shape[0]} != k/v batch {k.shape[0]} "
            f"({_shapes(q, k, v)})"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"flash_attention: head_dim mismatch: q head_dim {q.shape[3]} != k/v head_dim "
            f"{k.shape[3]} ({_shapes(q, k, v)})"
        )
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"flash_attention: num_heads ({heads}) must be divisible by num_kv_heads ({kv_heads}) "
            f"({_shapes(q, k, v)})"
        )
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, numbers.Integral)
        or sliding_window <= 0
    ):
        raise ValueError(
            f"flash_attention: sliding_window must be a positive int or None, got {sliding_window!r}"
        )
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(
            f"flash_attention: logit_soft_cap must be > 0 or None, got {logit_soft_cap!r}"
        )
    if sm_scale is not None and not isinstance(sm_scale, numbers.Real):
        raise ValueError(f"flash_attention: sm_scale must be a Python float, got {sm_scale!r}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block is not None and (not isinstance(block, numbers.Integral) or block <= 0):
            raise ValueError(f"flash_attention: {name} must be a positive int, got {block!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"flash_attention: unknown backend {backend!r}; expected one of {BACKENDS}"
        )
    if segment_ids is not None:
        expected = (q.shape[0], q.shape[1])
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"flash_attention: segment_ids require q_len == kv_len, got {_shapes(q, k, v)}"
            )
        if tuple(segment_ids.shape) != expected:
            raise ValueError(
                f"flash_attention: segment_ids must have shape [batch, seq]={expected}, got "
                f"segment_ids.shape={tuple(segment_ids.shape)} ({_shapes(q, k, v)})"
            )
        if segment_ids.dtype != jnp.int32:
            raise ValueError(
                f"flash_attention: segment_ids must be int32, got segment_ids.dtype="
                f"{segment_ids.dtype}"
            )
