"""Public paged_attention (decode): validation and dispatch between the Mosaic Pallas kernel
(TPU, or any platform with interpret=True) and the jnp reference (the CPU and GPU default)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm_kernels._platform import current_platform
from llm_kernels.flash_attention.config import AttentionConfig
from llm_kernels.paged_attention.pallas_tpu import paged_attention_kernel
from llm_kernels.paged_attention.reference import paged_attention_reference


def _validate(q, k_pages, v_pages, lengths, page_indices, sliding_window) -> None:
    shapes = (
        f"q.shape={tuple(q.shape)}, k_pages.shape={tuple(k_pages.shape)}, "
        f"v_pages.shape={tuple(v_pages.shape)}, lengths.shape={tuple(lengths.shape)}, "
        f"page_indices.shape={tuple(page_indices.shape)}"
    )
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "paged_attention: need q [batch, heads, head_dim] and k_pages == v_pages shape "
            f"[kv_heads, pages, page_size, head_dim]; got {shapes}"
        )
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"paged_attention: head_dim mismatch; got {shapes}")
    if q.shape[1] % k_pages.shape[0] != 0:
        raise ValueError(
            f"paged_attention: num_heads ({q.shape[1]}) must be divisible by num_kv_heads "
            f"({k_pages.shape[0]}); got {shapes}"
        )
    if (
        lengths.shape != (q.shape[0],)
        or page_indices.ndim != 2
        or page_indices.shape[0] != q.shape[0]
    ):
        raise ValueError(
            f"paged_attention: lengths must be [batch] and page_indices [batch, pages]; got {shapes}"
        )
    if lengths.dtype != jnp.int32 or page_indices.dtype != jnp.int32:
        raise ValueError(
            f"paged_attention: lengths and page_indices must be int32, got {lengths.dtype} and "
            f"{page_indices.dtype}"
        )
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"paged_attention: {name} must be floating, got {x.dtype}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(
            f"paged_attention: sliding_window must be a positive int or None, got {sliding_window!r}"
        )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    interpret: bool = False,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """One decode step against a paged KV cache. q: [B, H, D] -> [B, H, D].

    Sequence b's keys are pages page_indices[b] of k_pages/v_pages, of which the first
    lengths[b] tokens are valid; the query sits at position lengths[b] - 1.
    sinks: [H] learned logits in every softmax (GPT-OSS), in the kernel and the jax.numpy path.
    """
    _validate(q, k_pages, v_pages, lengths, page_indices, sliding_window)
    if sinks is not None and (sinks.ndim != 1 or sinks.shape[0] != q.shape[1]):
        raise ValueError(
            f"paged_attention: sinks must be [num_heads] = [{q.shape[1]}], got "
            f"sinks.shape={tuple(sinks.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if interpret or current_platform() == "tpu":
        cfg = AttentionConfig(
            causal=False,
            sliding_window=sliding_window,
            logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
            sm_scale=scale,
            block_q=q.shape[1] // k_pages.shape[0],
            block_k=k_pages.shape[2],
            interpret=interpret,
        )
        return paged_attention_kernel(q, k_pages, v_pages, lengths, page_indices, cfg, sinks)
    return paged_attention_reference(
        q, k_pages, v_pages, lengths, page_indices,
        sm_scale=scale, logit_soft_cap=logit_soft_cap, sliding_window=sliding_window, sinks=sinks,
    )  # fmt: skip
