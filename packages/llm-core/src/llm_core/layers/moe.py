"""Mixture-of-experts feed-forward (`moe` layer kind): a router and gated experts stored stacked.

Routing (`router_kind`):
- `softmax_topk` (Mixtral, Qwen3-MoE): softmax over all experts in float32, keep the top k, and
  renormalise them to sum to 1 when `norm_topk_prob`.

Two ways to run the experts, with the same parameters:
- dropless (`moe_capacity_factor: null`): the token-expert assignments are sorted by expert and every
  expert multiplies its contiguous block of rows. `moe_matmul: ragged_dot` does that with one grouped
  matmul (`jax.lax.ragged_dot`), which XLA:CPU runs as a dense matmul over every expert (experts-times
  the FLOPs). `moe_matmul: tiled` (default) pads each expert's rows to whole tiles and runs one batched
  matmul over the tiles, each tile against its expert's weights (at most one partly filled tile per
  expert); batches with few rows per expert (decoding) use ragged_dot, where that blow-up is small.
- capacity (`moe_capacity_factor: c`): each expert takes at most ceil(c * tokens * k / experts)
  assignments into a dense [experts, capacity, embed] buffer, served in token order. An assignment
  beyond its expert's capacity is dropped: it adds nothing to the token's output, so a token whose
  every assignment is dropped passes through the layer on the residual connection alone.

Auxiliary outputs per layer (summed over layers by the model): the Switch / Mixtral load-balancing
loss `E * sum_e f_e * P_e` (f_e: share of top-k assignments to expert e, P_e: mean router
probability), the router z-loss `mean(logsumexp(logits)^2)`, tokens per expert and dropped
assignments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.linear import GroupedLinear, Linear
from llm_core.layers.mlp import ACTIVATIONS
from llm_core.layers.params import dtype_of

MIN_ROWS_FOR_TILES = 16  # fewer rows per expert (decoding): ragged_dot's dense blow-up is small


def empty_aux(cfg) -> dict[str, jax.Array]:
    """The aux outputs of a dense layer in an MoE model (zeros, so every layer has the same keys)."""
    zero = jnp.zeros((), jnp.float32)
    return {
        "moe_lb_loss": zero,
        "moe_z_loss": zero,
        "moe_tokens_per_expert": jnp.zeros((cfg.num_experts,), jnp.float32),
        "moe_dropped": zero,
    }


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 router logits [T, E] -> (weights [T, k], expert ids [T, k], probabilities [T, E])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts, probs


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """Top-k assignments per expert [E] (float32) from expert ids [T, k]."""
    return jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)


def load_balancing_loss(probs: jax.Array, counts: jax.Array) -> jax.Array:
    """Switch / Mixtral auxiliary loss for one layer: E * sum_e (assignments_e / T) * mean_t P[t, e];
    probs [T, E], counts from `expert_counts`."""
    return probs.shape[1] * jnp.sum(counts / probs.shape[0] * probs.mean(0))


class MoE(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.capacity_factor = cfg.moe_capacity_factor
        self.matmul = cfg.moe_matmul
        e, m, n, wd = (
            cfg.emb_dim,
            cfg.resolved_moe_mlp_dim,
            cfg.num_experts,
            dtype_of(cfg.weight_dtype),
        )
        self.router = Linear(
            e, n, ("embed", None), weight_dtype=wd, out_dtype=jnp.float32, rngs=rngs
        )
        self.gate = GroupedLinear(n, e, m, ("exp", "embed", "mlp"), weight_dtype=wd, rngs=rngs)
        self.up = GroupedLinear(n, e, m, ("exp", "embed", "mlp"), weight_dtype=wd, rngs=rngs)
        self.down = GroupedLinear(n, m, e, ("exp", "mlp", "embed"), weight_dtype=wd, rngs=rngs)
        self.act = ACTIVATIONS[cfg.mlp_activation]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        weights, experts, probs = route(logits, self.top_k, self.normalize)
        if self.capacity_factor is None:
            y_assign, dropped = self._dropless(tokens, experts), jnp.zeros((), jnp.float32)
        else:
            y_assign, dropped = self._with_capacity(tokens, experts)
        y = jnp.einsum("tkd,tk->td", y_assign, weights.astype(y_assign.dtype))
        counts = expert_counts(experts, self.num_experts)
        aux = {
            "moe_lb_loss": load_balancing_loss(probs, counts),
            "moe_z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
            "moe_tokens_per_expert": counts,
            "moe_dropped": dropped,
        }
        return y.reshape(shape).astype(x.dtype), aux

    def _ffn(self, x, matmul):
        """The gated expert FFN, with `matmul(grouped_linear, x)` doing each expert-weight product."""
        return matmul(self.down, self.act(matmul(self.gate, x)) * matmul(self.up, x))

    def _dropless(self, tokens, experts):
        """Sort assignments by expert, grouped matmuls, unsort -> [T, k, D]."""
        t, k = experts.shape
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        rows_per_expert = t * k / self.num_experts
        if self.matmul == "ragged_dot" or rows_per_expert < MIN_ROWS_FOR_TILES:
            ys = self._ffn(tokens[order // k], lambda w, x: w.ragged(x, sizes))
        else:
            tile = 128 if rows_per_expert >= 128 else 64 if rows_per_expert >= 64 else 32
            ys = self._ffn_tiled(tokens[order // k], flat[order], sizes, tile)
        return jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)

    def _ffn_tiled(self, xs, expert_of_row, sizes, tile: int):
        """Rows sorted by expert -> each expert's rows padded to whole tiles -> one batched matmul per
        weight over the tiles -> back to the sorted rows."""
        n, e = xs.shape[0], self.num_experts
        padded = (sizes + tile - 1) // tile * tile
        pad_start = jnp.cumsum(padded) - padded
        rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[expert_of_row]
        dest = pad_start[expert_of_row] + rank  # padded row of each sorted row
        num_tiles = -(-n // tile) + e  # bound: one partly filled tile per expert
        x = jnp.zeros((num_tiles * tile, xs.shape[1]), xs.dtype).at[dest].set(xs)
        x = x.reshape(num_tiles, tile, -1)
        starts = jnp.arange(num_tiles) * tile
        tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), starts, side="right"), e - 1)
        y = self._ffn(x, lambda w, x: w.tiles(x, tile_expert))
        return y.reshape(num_tiles * tile, -1)[dest]

    def _with_capacity(self, tokens, experts):
        """Dense [E, capacity, D] buffer; assignments beyond capacity are dropped -> [T, k, D]."""
        t, k = experts.shape
        capacity = max(1, math.ceil(self.capacity_factor * t * k / self.num_experts))
        flat = experts.reshape(-1)
        onehot = jax.nn.one_hot(flat, self.num_experts, dtype=jnp.int32)
        slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, flat[:, None], axis=1)[:, 0]
        keep = slot < capacity
        slot = jnp.where(keep, slot, capacity)  # out of range: dropped by mode="drop"
        buf = jnp.zeros((self.num_experts, capacity, tokens.shape[-1]), tokens.dtype)
        buf = buf.at[flat, slot].set(jnp.repeat(tokens, k, axis=0), mode="drop")
        out = self._ffn(buf, lambda w, x: w.dense(x))
        ys = out.at[flat, slot].get(mode="fill", fill_value=0)
        dropped = jnp.sum(~keep).astype(jnp.float32)
        return ys.reshape(t, k, -1), dropped
