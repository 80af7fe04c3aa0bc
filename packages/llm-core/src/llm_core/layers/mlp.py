"""Feed-forward blocks: gated (SwiGLU / GeGLU) or plain (GPT), optional biases."""

from __future__ import annotations

import jax
from flax import nnx

from llm_core.layers.params import dtype_of, param

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class MLP(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        e, m, wd = cfg.emb_dim, cfg.mlp_dim, dtype_of(cfg.weight_dtype)
        if cfg.gated_mlp:
            self.gate = param(rngs, (e, m), ("embed", "mlp"), wd)
        self.up = param(rngs, (e, m), ("embed", "mlp"), wd)
        self.down = param(rngs, (m, e), ("mlp", "embed"), wd)
        if cfg.mlp_bias:
            self.up_bias = param(rngs, (m,), ("mlp",), wd, init="zeros")
            self.down_bias = param(rngs, (e,), ("embed",), wd, init="zeros")
        self.act = ACTIVATIONS[cfg.mlp_activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        up = x @ self.up[...].astype(dt)
        if self.cfg.mlp_bias:
            up = up + self.up_bias[...].astype(dt)
        hidden = (
            self.act(x @ self.gate[...].astype(dt)) * up if self.cfg.gated_mlp else self.act(up)
        )
        y = hidden @ self.down[...].astype(dt)
        if self.cfg.mlp_bias:
            y = y + self.down_bias[...].astype(dt)
        return y
