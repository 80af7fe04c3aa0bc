"""Shared helpers for the llm-kernels tests (a uniquely named module, not a conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import llm_kernels


def rand(rng: np.random.Generator, shape, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def qkv(rng, batch, q_len, kv_len, heads, kv_heads, dim, dtype=jnp.float32):
    return (
        rand(rng, (batch, q_len, heads, dim), dtype),
        rand(rng, (batch, kv_len, kv_heads, dim), dtype),
        rand(rng, (batch, kv_len, kv_heads, dim), dtype),
    )


def packed_segments(batch: int, length: int, sizes: list[int]) -> jax.Array:
    """Segment ids [batch, length] from consecutive segment sizes (last one takes the rest)."""
    ids = np.zeros(length, np.int32)
    start = 0
    for seg, size in enumerate(sizes):
        ids[start : start + size] = seg
        start += size
    ids[start:] = len(sizes)
    return jnp.asarray(np.tile(ids, (batch, 1)))


def grads(fn, q, k, v):
    """(dq, dk, dv) of a fixed random projection of fn's output (not just a sum)."""
    proj = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32) * 0.7)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * proj)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def max_err(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def scaled_err(a: jax.Array, b: jax.Array) -> float:
    """max|a - b| / max(1, max|b|): for bf16, whose spacing grows with magnitude (one ulp at 8
    is 0.0625), an absolute bound would test rounding, not the kernel."""
    scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
    return max_err(a, b) / scale


def attention_pair(backend: str, interpret: bool = False, **kw):
    """(kernel fn, reference fn) of (q, k, v) with the same masking options."""
    block = {k: kw.pop(k) for k in ("block_q", "block_k") if k in kw}

    def kernel(q, k, v):
        return llm_kernels.flash_attention(
            q, k, v, backend=backend, interpret=interpret, **block, **kw
        )

    def reference(q, k, v):
        return llm_kernels.mha_reference(q, k, v, **kw)

    return kernel, reference
