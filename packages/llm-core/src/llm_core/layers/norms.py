"""RMSNorm (optionally Gemma's x * (1 + w)) and LayerNorm with bias; statistics in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.params import param


class RMSNorm(nnx.Module):
    def __init__(
        self, dim: int, eps: float, plus_one: bool, weight_dtype, rngs: nnx.Rngs | None = None
    ):
        self.eps = eps
        self.plus_one = plus_one
        # Gemma stores w with the identity at 0; others at 1.
        self.scale = param(
            rngs, (dim,), ("norm",), weight_dtype, init="zeros" if plus_one else "ones"
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...].astype(jnp.float32)
        y = y * (1.0 + w) if self.plus_one else y * w
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, weight_dtype, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("norm",), weight_dtype, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), weight_dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(cfg, dim: int | None = None, rngs: nnx.Rngs | None = None) -> nnx.Module:
    from llm_core.layers.params import dtype_of

    dim = dim or cfg.emb_dim
    if cfg.norm_kind == "layer":
        return LayerNorm(dim, cfg.norm_eps, dtype_of(cfg.weight_dtype), rngs=rngs)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_plus_one, dtype_of(cfg.weight_dtype), rngs=rngs)
