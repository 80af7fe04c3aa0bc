"""Multi-head latent attention (`mla` layer kind, DeepSeek-V2/V3).

Queries: `q` [embed -> heads x (nope + rope)], or with `q_lora_rank` a bottleneck `q_a` -> RMSNorm ->
`q_b`. Keys and values come from one projection `kv_a` [embed -> kv_lora_rank + rope] per token: its
first kv_lora_rank values are normalised into the latent c, the last qk_rope_head_dim are the rotary
key k_rope shared by every head. `kv_b` [kv_lora_rank -> heads x (nope + v)] expands c into the
per-head non-rotary keys and the values. A head's key is [k_nope, k_rope], its query [q_nope, q_rope].

Two forms of the same attention:
- expanded (training, no cache): K and V per head from kv_b, then any attention backend;
- absorbed (with a cache: prefill and decode): the cache holds only [c, k_rope] per token
  (`latent_cache.py`). q_nope . k_nope = (q_nope W_k^T) . c, so each query is projected into the
  latent space once and attends over the cached rows as one shared key head; the output's latent part
  times W_v is the head's value sum. Per-head K/V is never rebuilt for the context.

The softmax scale is (nope + rope)^-0.5, times mscale(factor, rope_yarn_mscale_all_dim)^2 under a
scaled RoPE, as transformers computes it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llm_core.layers import attention_ops as ops
from llm_core.layers.latent_cache import LatentKV, PagedLatentKV
from llm_core.layers.linear import Linear
from llm_core.layers.norms import RMSNorm
from llm_core.layers.params import dtype_of
from llm_core.layers.rope import apply_rope, rope_spec, yarn_mscale

LATENT_NORM_EPS = 1e-6  # transformers builds the q_a / kv_a norms with their default epsilon


def mla_softmax_scale(cfg) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_kind != "default" and cfg.rope_yarn_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.rope_yarn_mscale_all_dim) ** 2
    return scale


class MLAttention(nnx.Module):
    """Owns its latent cache (`init_cache`, then pass it in), like `Attention`."""

    def __init__(self, cfg, kind, rngs: nnx.Rngs):
        """kind: the layer's `LayerKind` (its sliding window)."""
        self.cfg = cfg
        local = kind.local
        e, h, wd, bias = cfg.emb_dim, cfg.num_heads, dtype_of(cfg.weight_dtype), cfg.attention_bias
        self.nope, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.rank, qk = cfg.kv_lora_rank, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a = Linear(
                e, cfg.q_lora_rank, ("embed", "q_lora"), weight_dtype=wd, use_bias=bias, rngs=rngs
            )
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, False, wd, rngs=rngs)
            self.q_b = Linear(
                cfg.q_lora_rank,
                (h, qk),
                ("q_lora", "heads", "head_dim"),
                weight_dtype=wd,
                rngs=rngs,
            )
        else:
            self.q = Linear(e, (h, qk), ("embed", "heads", "head_dim"), weight_dtype=wd, rngs=rngs)
        self.kv_a = Linear(
            e, self.rank + self.rope_dim, ("embed", "kv_lora"), weight_dtype=wd, use_bias=bias,
            rngs=rngs,
        )  # fmt: skip
        self.kv_a_norm = RMSNorm(self.rank, LATENT_NORM_EPS, False, wd, rngs=rngs)
        self.kv_b = Linear(
            self.rank, (h, self.nope + cfg.v_head_dim), ("kv_lora", "heads", "head_dim"),
            weight_dtype=wd, rngs=rngs,
        )  # fmt: skip
        self.o = Linear(
            (h, cfg.v_head_dim), e, ("heads", "head_dim", "embed"), weight_dtype=wd,
            use_bias=bias, rngs=rngs,
        )  # fmt: skip
        self.spec = ops.AttentionSpec(
            context_strategy=cfg.context_parallel_strategy,
            scale=mla_softmax_scale(cfg),
            sliding_window=cfg.sliding_window if (local or cfg.attention_pattern is None) else None,
            logit_softcap=cfg.attn_logit_softcap,
        )
        self.rope = rope_spec(cfg, local=local, rotary_dim=self.rope_dim)

    @staticmethod
    def init_cache(
        cfg, batch: int, max_len: int, dtype, *, kind="contiguous", num_pages=0, page_size=16
    ):
        """An empty latent cache for one layer: kv_lora_rank + qk_rope_head_dim values per token."""
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        if kind == "paged":
            pages = max_len // page_size
            return PagedLatentKV.create(batch, width, num_pages, page_size, pages, dtype)
        return LatentKV.create(batch, max_len, width, dtype)

    def __call__(self, x, positions, segment_ids=None, cache=None):
        """Same contract as `Attention.__call__`: (out [B, S, E], new cache or None)."""
        if self.cfg.q_lora_rank:
            q = self.q_b(self.q_a_norm(self.q_a(x)))
        else:
            q = self.q(x)
        q_nope, q_rope = q[..., : self.nope], apply_rope(q[..., self.nope :], positions, self.rope)
        kv = self.kv_a(x)
        latent = self.kv_a_norm(kv[..., : self.rank])
        k_rope = apply_rope(kv[..., None, self.rank :], positions, self.rope)  # [B, S, 1, rope]
        if cache is not None:
            return self._absorbed(q_nope, q_rope, latent, k_rope, positions, cache)
        kv_b = self.kv_b(latent)  # [B, S, H, nope + v]
        k = jnp.concatenate(
            [kv_b[..., : self.nope], jnp.broadcast_to(k_rope, q_rope.shape).astype(kv_b.dtype)], -1
        )
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        cfg = self.cfg
        out = ops.self_attention(
            q, k, kv_b[..., self.nope :], positions, segment_ids, self.spec,
            cfg.attention_backend, cfg.attention_chunk_size,
        )  # fmt: skip
        return self.o(out), None

    def _absorbed(self, q_nope, q_rope, latent, k_rope, positions, cache):
        cache = cache.write(jnp.concatenate([latent, k_rope[:, :, 0]], axis=-1), positions)
        w = self.kv_b.weight(q_nope.dtype)  # [rank, H, nope + v]
        q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w[..., : self.nope])
        q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
        cfg = self.cfg
        ctx = cache.attend(q, positions, self.spec, cfg.attention_backend, cfg.attention_chunk_size)
        out = jnp.einsum("bshr,rhv->bshv", ctx[..., : self.rank], w[..., self.nope :])
        return self.o(out), cache
