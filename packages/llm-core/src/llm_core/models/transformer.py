"""The decoder skeleton shared by every family.

Layers are grouped by the repeating attention pattern (1 layer for most families, [local, global] for
Gemma 2, 5 local + 1 global for Gemma 3). Whole groups are stacked along a leading `layers` axis and
run with `lax.scan` (`scan_layers=True`) or a Python loop over the same stacked parameters
(`scan_layers=False`), so checkpoints are identical either way. Layers left over when num_layers is not
a multiple of the group size live unstacked in `tail`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.attention import Attention
from llm_core.layers.embeddings import Embedder
from llm_core.layers.kv_cache import KVCache
from llm_core.layers.mlp import MLP
from llm_core.layers.norms import make_norm
from llm_core.layers.params import dtype_of, param

REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def output_logits(cfg, x, final_norm, embedder, lm_head):
    """Final norm, output head (tied when `lm_head` is None) and final soft-cap, in float32.

    A function, not only a method, so serving paths that run the layers themselves share it."""
    x = final_norm(x)
    if lm_head is None:
        logits = embedder.attend(x)
    else:
        logits = jnp.einsum(
            "bse,ev->bsv", x, lm_head.astype(x.dtype), preferred_element_type=jnp.float32
        )
    if cfg.final_logit_softcap is not None:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, kind: str, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pre_attn_norm = make_norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, kind, rngs=rngs)
        self.pre_mlp_norm = make_norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.post_norms:
            self.post_attn_norm = make_norm(cfg, rngs=rngs)
            self.post_mlp_norm = make_norm(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids=None, cache_kv=None):
        h, cache_kv = self.attn(self.pre_attn_norm(x), positions, segment_ids, cache_kv)
        if self.cfg.post_norms:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.cfg.post_norms:
            h = self.post_mlp_norm(h)
        return x + h, cache_kv


class LayerGroup(nnx.Module):
    """Consecutive layers with the given attention kinds; the unit that is stacked and scanned."""

    def __init__(self, cfg, kinds: tuple[str, ...], rngs: nnx.Rngs):
        self.size = len(kinds)
        for j, kind in enumerate(kinds):
            setattr(self, f"layer_{j}", DecoderLayer(cfg, kind, rngs=rngs))

    def __call__(self, x, positions, segment_ids=None, cache_kv=None):
        """cache_kv: (k, v) each [size, B, L, K, D] or None."""
        new_k, new_v = [], []
        for j in range(self.size):
            layer_cache = None if cache_kv is None else (cache_kv[0][j], cache_kv[1][j])
            x, layer_cache = getattr(self, f"layer_{j}")(x, positions, segment_ids, layer_cache)
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        return x, (None if cache_kv is None else (jnp.stack(new_k), jnp.stack(new_v)))


class Transformer(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        pattern = cfg.attention_pattern or ["global"]
        group = tuple(pattern)
        self.num_groups = cfg.num_layers // len(group)
        tail = cfg.num_layers - self.num_groups * len(group)
        self.embedder = Embedder(cfg, rngs=rngs)

        @nnx.split_rngs(splits=self.num_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs: nnx.Rngs) -> LayerGroup:
            return LayerGroup(cfg, group, rngs=rngs)

        self.groups = make_groups(rngs) if self.num_groups else None
        self.tail = LayerGroup(cfg, group[:tail], rngs=rngs) if tail else None
        self.final_norm = make_norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs, (cfg.emb_dim, cfg.vocab_size), ("embed", "vocab"), dtype_of(cfg.weight_dtype)
            )

    # ------------------------------------------------------------------ public API
    def __call__(self, input_ids, positions=None, segment_ids=None):
        """int32 [B, S] -> float32 logits [B, S, V]. Packed sequences: pass per-segment positions and
        segment_ids (tokens attend only within their segment)."""
        if positions is None:
            positions = jnp.broadcast_to(
                jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
            )
        logits, _ = self._forward(input_ids, positions, segment_ids, None)
        return logits

    def forward_with_cache(self, input_ids, positions, cache: KVCache):
        """Serving path: writes K/V of the new tokens at their positions; returns (logits, cache)."""
        return self._forward(input_ids, positions, None, cache)

    def logits(self, x):
        """Hidden states [B,S,E] after the last layer -> float32 logits."""
        head = None if self.cfg.tie_embeddings else self.lm_head[...]
        return output_logits(self.cfg, x, self.final_norm, self.embedder, head)

    # ------------------------------------------------------------------ internals
    def _forward(self, tokens, positions, segment_ids, cache):
        cfg = self.cfg
        x = self.embedder.encode(tokens, positions, dtype_of(cfg.dtype))
        g = cfg.scan_group_size
        n = self.num_groups * g
        group_cache = tail_cache = None
        if cache is not None:
            reshape = lambda a: a[:n].reshape(self.num_groups, g, *a.shape[1:])  # noqa: E731
            group_cache = (reshape(cache.k), reshape(cache.v))
            tail_cache = (cache.k[n:], cache.v[n:])
        x, group_cache = self._run_groups(x, positions, segment_ids, group_cache)
        if self.tail is not None:
            x, tail_cache = self.tail(
                x, positions, segment_ids, tail_cache if cache is not None else None
            )
        logits = self.logits(x)
        if cache is None:
            return logits, None
        k = group_cache[0].reshape(n, *group_cache[0].shape[2:])
        v = group_cache[1].reshape(n, *group_cache[1].shape[2:])
        if self.tail is not None:
            k, v = jnp.concatenate([k, tail_cache[0]]), jnp.concatenate([v, tail_cache[1]])
        return logits, KVCache(k=k, v=v)

    def _run_groups(self, x, positions, segment_ids, group_cache):
        if self.groups is None:
            return x, group_cache
        graphdef, state = nnx.split(self.groups)

        def body(x, xs):
            group_state, cache_kv = xs
            x, cache_kv = nnx.merge(graphdef, group_state)(x, positions, segment_ids, cache_kv)
            return x, cache_kv

        if self.cfg.remat_policy != "none":
            body = jax.checkpoint(
                body, policy=REMAT_POLICIES[self.cfg.remat_policy], prevent_cse=False
            )
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x, (state, group_cache))
        outs = []
        for i in range(self.num_groups):
            xs = jax.tree.map(lambda a, i=i: a[i], (state, group_cache))
            x, out = body(x, xs)
            outs.append(out)
        if group_cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def build_model(cfg, *, rngs: nnx.Rngs) -> Transformer:
    """A randomly initialised model for `cfg` (weights in cfg.weight_dtype)."""
    return Transformer(cfg, rngs=rngs)
