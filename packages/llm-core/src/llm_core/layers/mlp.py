"""Feed-forward blocks: gated (SwiGLU / GeGLU) or plain (GPT), optional biases."""

from __future__ import annotations

import jax
from flax import nnx

from llm_core.layers.linear import Linear
from llm_core.layers.params import dtype_of

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class MLP(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs, mlp_dim: int | None = None):
        self.gated = cfg.gated_mlp
        e, m, wd = cfg.emb_dim, mlp_dim or cfg.mlp_dim, dtype_of(cfg.weight_dtype)
        bias = cfg.mlp_bias
        if self.gated:
            self.gate = Linear(e, m, ("embed", "mlp"), weight_dtype=wd, rngs=rngs)
        self.up = Linear(e, m, ("embed", "mlp"), weight_dtype=wd, use_bias=bias, rngs=rngs)
        self.down = Linear(m, e, ("mlp", "embed"), weight_dtype=wd, use_bias=bias, rngs=rngs)
        self.act = ACTIVATIONS[cfg.mlp_activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        up = self.up(x)
        hidden = self.act(self.gate(x)) * up if self.gated else self.act(up)
        return self.down(hidden)
