"""Auxiliary-loss-free load balancing (DeepSeek-V3): move each MoE layer's expert-choice bias
toward an even load, outside the optimizer.

After every step, expert e of a layer gets `bias_e += rate * sign(mean load - load_e)`, where load
counts the tokens routed to each expert in that step (summed over micro-batches): an overloaded
expert becomes less likely to be chosen, an idle one more. The bias only chooses experts (the
weights stay the unbiased sigmoid scores), so the language-model gradient is untouched. The biases
are `RouterBias` parameters: they live in the train state's `rest` (no optimizer state), are saved
in checkpoints and exported with the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _key(entry) -> str | None:
    return getattr(entry, "key", None)


def update_router_bias(rest, loads: dict, rate: float):
    """`rest` with every `router_bias` moved by `rate` against its layer's load. loads:
    {segment: {layer_j: [groups, experts] or [experts]}}, as the model's aux["router_load"]."""

    def step(path, leaf):
        keys = [_key(p) for p in path]
        if "router_bias" not in keys:
            return leaf
        segment, layer = keys[0], keys[1]
        load = loads[segment][layer].astype(jnp.float32)
        push = jnp.sign(load.mean(-1, keepdims=True) - load)
        return (leaf.astype(jnp.float32) + rate * push).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(step, rest)
