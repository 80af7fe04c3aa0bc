"""Multi-head / grouped-query attention with RoPE, QK-norm, soft-capping, sliding windows,
attention sinks (`attention_sinks`: a learned logit per head in every softmax, GPT-OSS) and Llama 4's
NoPE layers, chunked attention, weightless QK norm and query temperature tuning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers import attention_ops as ops
from llm_core.layers.kv_cache import ContiguousKV, Int8ContiguousKV, Int8PagedKV, PagedKV
from llm_core.layers.linear import Linear
from llm_core.layers.norms import RMSNorm
from llm_core.layers.params import dtype_of, param
from llm_core.layers.rope import apply_rope, rope_spec


class Attention(nnx.Module):
    """Grouped-query attention (`gqa` layer kind); owns its cache (`init_cache`, then pass it in)."""

    def __init__(self, cfg, kind, rngs: nnx.Rngs):
        """kind: the layer's `LayerKind` (sliding window, RoPE or not)."""
        self.cfg = cfg
        self.local = kind.local
        self.use_rope = kind.rope and cfg.position_embedding == "rope"
        e, h, k, d = cfg.emb_dim, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
        wd = dtype_of(cfg.weight_dtype)
        bias = cfg.attention_bias
        self.q = Linear(
            e, (h, d), ("embed", "heads", "head_dim"), weight_dtype=wd, use_bias=bias, rngs=rngs
        )
        self.k = Linear(
            e, (k, d), ("embed", "kv_heads", "head_dim"), weight_dtype=wd, use_bias=bias, rngs=rngs
        )
        self.v = Linear(
            e, (k, d), ("embed", "kv_heads", "head_dim"), weight_dtype=wd, use_bias=bias, rngs=rngs
        )
        self.o = Linear(
            (h, d), e, ("heads", "head_dim", "embed"), weight_dtype=wd, use_bias=bias, rngs=rngs
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_plus_one, wd, rngs=rngs)
            self.k_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_plus_one, wd, rngs=rngs)
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else d
        self.spec = ops.AttentionSpec(
            context_strategy=cfg.context_parallel_strategy,
            scale=scalar**-0.5,
            sliding_window=cfg.sliding_window
            if (self.local or cfg.attention_pattern is None)
            else None,
            logit_softcap=cfg.attn_logit_softcap,
            chunk=cfg.attention_local_chunk if self.use_rope else None,
        )
        self.rope = rope_spec(cfg, local=self.local) if self.use_rope else None
        self.sinks = param(rngs, (h,), ("heads",), wd) if cfg.attention_sinks else None

    @staticmethod
    def init_cache(
        cfg,
        batch: int,
        max_len: int,
        dtype,
        *,
        kind: str = "contiguous",
        num_pages: int = 0,
        page_size: int = 16,
    ):
        """An empty cache for one layer: `contiguous` [batch, max_len] or `paged` (a pool of
        `num_pages` pages shared by the batch rows, each row's table covering max_len positions)."""
        kh, d = cfg.resolved_num_kv_heads, cfg.resolved_head_dim
        if cfg.kv_cache_dtype == "int8":
            if kind == "paged":
                pages = max_len // page_size
                return Int8PagedKV.create(batch, kh, d, num_pages, page_size, pages)
            return Int8ContiguousKV.create(batch, max_len, kh, d)
        if kind == "paged":
            return PagedKV.create(batch, kh, d, num_pages, page_size, max_len // page_size, dtype)
        return ContiguousKV.create(batch, max_len, kh, d, dtype)

    def __call__(self, x, positions, segment_ids=None, cache=None):
        """x [B,S,E]. Without cache: self-attention over x. With a cache: writes the new K/V at
        `positions` and attends over the cache. Returns (out [B,S,E], new cache or None)."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope)
            if self.cfg.qk_l2_norm:
                q, k = _rms_normalize(q, self.cfg.norm_eps), _rms_normalize(k, self.cfg.norm_eps)
        elif self.cfg.attn_temperature_tuning:
            q = _temperature_tuned(q, positions, self.cfg)
        cfg = self.cfg
        sinks = None if self.sinks is None else self.sinks[...]
        if cache is not None:
            cache = cache.write(k, v, positions)
            out = cache.attend(
                q, positions, self.spec, cfg.attention_backend, cfg.attention_chunk_size, sinks
            )
        else:
            out = ops.self_attention(
                q, k, v, positions, segment_ids, self.spec, cfg.attention_backend,
                cfg.attention_chunk_size, sinks,
            )  # fmt: skip
        return self.o(out), cache


def _rms_normalize(x, eps: float):
    """Llama 4's weightless QK norm: x / rms(x), in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def _temperature_tuned(q, positions, cfg):
    """Llama 4's NoPE-layer query scaling: log(floor((p + 1) / floor_scale) + 1) * scale + 1."""
    p = positions.astype(jnp.float32)
    scale = jnp.log1p(jnp.floor((p + 1.0) / cfg.attn_floor_scale)) * cfg.attn_temperature_scale
    return (q.astype(jnp.float32) * (scale + 1.0)[:, :, None, None]).astype(q.dtype)


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward matmul FLOPs of attention scores + values per token (causal halves it); MLA counted
    in its expanded (training) form."""
    if cfg.attention_kind == "mla":
        width = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        width = 2 * cfg.resolved_head_dim
    return 2 * cfg.num_heads * width * seq_len / 2
