"""Token embeddings (optionally Gemma's sqrt(d) scale), learned positions, and the output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.linear import flat_product
from llm_core.layers.params import dtype_of, param


class Embedder(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        wd = dtype_of(cfg.weight_dtype)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.emb_dim), ("vocab", "embed"), wd)
        if cfg.position_embedding == "learned":
            self.positions = param(
                rngs, (cfg.max_position_embeddings, cfg.emb_dim), (None, "embed"), wd, scale=0.01
            )

    def encode(self, tokens: jax.Array, positions: jax.Array, dtype) -> jax.Array:
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)
        if self.cfg.scale_embeddings:
            # Gemma rounds the normaliser to the compute dtype, as Hugging Face does.
            x = x * jnp.asarray(self.cfg.emb_dim**0.5, dtype)
        if self.cfg.position_embedding == "learned":
            x = x + jnp.take(self.positions[...], positions, axis=0, mode="clip").astype(dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x @ embedding^T, accumulated in float32 (`flat_product`, as every
        Linear: the embedding's gradient reads the logits' gradient in place)."""
        return flat_product(x, self.embedding[...].astype(x.dtype).T, 1, jnp.float32)
