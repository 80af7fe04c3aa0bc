"""Multi-head / grouped-query attention with RoPE, QK-norm, soft-capping and sliding windows."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llm_core.layers import attention_ops as ops
from llm_core.layers.norms import RMSNorm
from llm_core.layers.params import dtype_of, param
from llm_core.layers.rope import apply_rope, rope_spec


class Attention(nnx.Module):
    def __init__(self, cfg, kind: str, rngs: nnx.Rngs):
        self.cfg = cfg
        self.local = kind == "local"
        e, h, k, d = cfg.emb_dim, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
        wd = dtype_of(cfg.weight_dtype)
        self.q = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), wd)
        self.k = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), wd)
        self.v = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), wd)
        self.o = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), wd)
        if cfg.attention_bias:
            self.q_bias = param(rngs, (h, d), ("heads", "head_dim"), wd, init="zeros")
            self.k_bias = param(rngs, (k, d), ("kv_heads", "head_dim"), wd, init="zeros")
            self.v_bias = param(rngs, (k, d), ("kv_heads", "head_dim"), wd, init="zeros")
            self.o_bias = param(rngs, (e,), ("embed",), wd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_plus_one, wd, rngs=rngs)
            self.k_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_plus_one, wd, rngs=rngs)
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else d
        self.spec = ops.AttentionSpec(
            scale=scalar**-0.5,
            sliding_window=cfg.sliding_window
            if (self.local or cfg.attention_pattern is None)
            else None,
            logit_softcap=cfg.attn_logit_softcap,
        )
        self.rope = rope_spec(cfg, local=self.local) if cfg.position_embedding == "rope" else None

    def __call__(self, x, positions, segment_ids=None, cache_kv=None):
        """x [B,S,E]. Without cache: self-attention over x. With cache_kv=(k [B,L,K,D], v): writes the new
        K/V at `positions` and attends over the cache. Returns (out [B,S,E], new cache_kv or None)."""
        dt = x.dtype
        q = jnp.einsum("bse,ehd->bshd", x, self.q[...].astype(dt))
        k = jnp.einsum("bse,ekd->bskd", x, self.k[...].astype(dt))
        v = jnp.einsum("bse,ekd->bskd", x, self.v[...].astype(dt))
        if self.cfg.attention_bias:
            q, k, v = (
                q + self.q_bias[...].astype(dt),
                k + self.k_bias[...].astype(dt),
                v + self.v_bias[...].astype(dt),
            )
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope)
        out, new_cache = self._attend(q, k, v, positions, segment_ids, cache_kv)
        y = jnp.einsum("bshd,hde->bse", out, self.o[...].astype(dt))
        if self.cfg.attention_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, new_cache

    def _attend(self, q, k, v, positions, segment_ids, cache_kv):
        cfg, spec = self.cfg, self.spec
        if cache_kv is not None:
            from llm_core.layers.kv_cache import write_layer

            ck, cv = write_layer(*cache_kv, k, v, positions)
            kv_pos = jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), ck.shape[:2])
            fn = (
                ops.chunked_attention
                if cfg.attention_backend == "chunked"
                else ops.dot_product_attention
            )
            kwargs = {"chunk": cfg.attention_chunk_size} if fn is ops.chunked_attention else {}
            out = fn(q, ck.astype(q.dtype), cv.astype(q.dtype), positions, kv_pos, spec, **kwargs)
            return out, (ck, cv)
        if cfg.attention_backend == "flash":
            return ops.flash_attention(q, k, v, spec, segment_ids), None
        if cfg.attention_backend == "chunked":
            out = ops.chunked_attention(
                q,
                k,
                v,
                positions,
                positions,
                spec,
                segment_ids,
                segment_ids,
                chunk=cfg.attention_chunk_size,
            )
            return out, None
        return ops.dot_product_attention(
            q, k, v, positions, positions, spec, segment_ids, segment_ids
        ), None


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward matmul FLOPs of attention scores + values per token (causal halves it)."""
    return 2 * 2 * cfg.num_heads * cfg.resolved_head_dim * seq_len / 2
