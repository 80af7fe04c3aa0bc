"""Mixture-of-experts feed-forward (`moe` layer kind): a router and gated experts stored stacked.

Routing (`router_kind`, all in float32):
- `softmax_topk` (Mixtral, Qwen3-MoE, DeepSeek-V2): softmax over all experts, keep the top k, and
  renormalise them to sum to 1 when `norm_topk_prob`.
- `sigmoid_topk` (DeepSeek-V3): sigmoid scores; a per-expert bias (`RouterBias`, moved by llm-train's
  aux-loss-free balancing, never by the optimizer) is added to choose the k experts, whose weights
  are their unbiased scores (renormalised when `norm_topk_prob`).
- `topk_softmax` (GPT-OSS): the top k logits (the router may have a bias), then a softmax over
  those k.
- `topk_sigmoid_input` (Llama 4): each of the top k logits' sigmoid scales the token on its way
  *into* that expert (each assignment runs as its own row); the experts' outputs are added
  unweighted.
With `moe_num_groups` > 1 only experts of the best `moe_topk_groups` groups are eligible (a group
scores its best expert for softmax, the sum of its two best biased scores for sigmoid); the others
score -inf or 0 (`router_group_mask`). The weights are then multiplied by `routed_scaling_factor`.
`num_shared_experts` adds an always-on MLP (DeepSeek's shared experts) to the routed output.

Two ways to run the experts, with the same parameters (the expert FFN itself is in `experts.py`):
- dropless (`moe_capacity_factor: null`): the token-expert assignments are sorted by expert and every
  expert multiplies its contiguous block of rows, with the grouped product `moe_matmul` names.
- capacity (`moe_capacity_factor: c`): each expert takes at most ceil(c * tokens * k / experts)
  assignments into a dense [experts, capacity, embed] buffer, served in token order. An assignment
  beyond its expert's capacity is dropped: it adds nothing to the token's output, so a token whose
  every assignment is dropped passes through the layer on the residual connection alone.
Under a context mesh with an `expert` axis > 1 both run expert-parallel instead (all-to-all
dispatch, `expert_parallel.py`), where a capacity limits each (device, expert shard) pair.

Auxiliary outputs per layer (summed over layers by the model): the Switch / Mixtral load-balancing
loss `E * sum_e f_e * P_e` (f_e: share of top-k assignments to expert e, P_e: mean router
probability), the router z-loss `mean(logsumexp(logits)^2)`, tokens per expert and dropped
assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers import expert_parallel
from llm_core.layers.experts import (
    ExpertWeights,
    capacity_buffer_ffn,
    gated_activation,
    sorted_expert_ffn,
)
from llm_core.layers.linear import GroupedLinear, Linear
from llm_core.layers.mlp import MLP
from llm_core.layers.params import dtype_of
from llm_core.layers.qat import ExpertQuantization


def empty_aux(cfg) -> dict[str, jax.Array]:
    """The aux outputs of a dense layer in an MoE model (zeros, so every layer has the same keys)."""
    zero = jnp.zeros((), jnp.float32)
    return {
        "moe_lb_loss": zero,
        "moe_z_loss": zero,
        "moe_tokens_per_expert": jnp.zeros((cfg.num_experts,), jnp.float32),
        "moe_dropped": zero,
    }


class RouterBias(nnx.Param):
    """The sigmoid router's expert-choice bias (HF `e_score_correction_bias`): saved and converted
    with the weights, but llm-train keeps it out of the optimizer and moves it by expert load."""


@dataclass(frozen=True)
class Routing:
    k: int
    normalize: bool = True
    kind: str = "softmax_topk"
    groups: int = 1
    topk_groups: int = 1
    group_mask: str = "neg_inf"
    scaling: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> Routing:
        return cls(
            cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router_kind, cfg.moe_num_groups,
            cfg.moe_topk_groups, cfg.router_group_mask, cfg.routed_scaling_factor,
        )  # fmt: skip


def route(
    logits: jax.Array, routing: Routing, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k], expert ids [T, k], scores [T, E]), float32."""
    logits = logits.astype(jnp.float32)
    if routing.kind == "topk_sigmoid_input":  # weights scale the expert input (see MoE)
        top, experts = jax.lax.top_k(logits, routing.k)
        return jax.nn.sigmoid(top), experts, jax.nn.sigmoid(logits)
    if routing.kind == "topk_softmax":
        top, experts = jax.lax.top_k(logits, routing.k)
        return jax.nn.softmax(top, axis=-1) * routing.scaling, experts, jax.nn.softmax(logits, -1)
    if routing.kind == "sigmoid_topk":
        scores = jax.nn.sigmoid(logits)
        choice = scores if bias is None else scores + bias.astype(jnp.float32)
    else:
        scores = choice = jax.nn.softmax(logits, axis=-1)
    if routing.groups > 1:
        choice = _limit_to_groups(choice, routing)
    _, experts = jax.lax.top_k(choice, routing.k)
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if routing.normalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * routing.scaling, experts, scores


def _limit_to_groups(choice: jax.Array, routing: Routing) -> jax.Array:
    """Experts outside the best `topk_groups` groups score -inf (or 0) for the top-k choice."""
    t, e = choice.shape
    grouped = choice.reshape(t, routing.groups, e // routing.groups)
    if routing.kind == "sigmoid_topk":
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
        group_score = grouped.max(-1)
    _, best = jax.lax.top_k(group_score, routing.topk_groups)
    keep = jnp.zeros((t, routing.groups), bool).at[jnp.arange(t)[:, None], best].set(True)
    fill = -jnp.inf if routing.group_mask == "neg_inf" else 0.0
    return jnp.where(jnp.repeat(keep, e // routing.groups, axis=1), choice, fill)


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """Top-k assignments per expert [E] (float32) from expert ids [T, k]."""
    return jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)


def load_balancing_loss(probs: jax.Array, counts: jax.Array) -> jax.Array:
    """Switch / Mixtral auxiliary loss for one layer: E * sum_e (assignments_e / T) * mean_t P[t, e];
    probs [T, E], counts from `expert_counts`."""
    return probs.shape[1] * jnp.sum(counts / probs.shape[0] * probs.mean(0))


class MoE(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.num_experts, self.routing = cfg.num_experts, Routing.from_config(cfg)
        self.capacity_factor = cfg.moe_capacity_factor
        self.matmul = cfg.moe_matmul
        self.quant = ExpertQuantization.from_config(cfg)
        self.batch_axes = expert_parallel.batch_axes(cfg.logical_axis_rules)
        e, m, n, wd = (
            cfg.emb_dim,
            cfg.resolved_moe_mlp_dim,
            cfg.num_experts,
            dtype_of(cfg.weight_dtype),
        )
        self.router = Linear(
            e, n, ("embed", None), weight_dtype=wd, out_dtype=jnp.float32,
            use_bias=cfg.moe_router_bias, rngs=rngs,
        )  # fmt: skip
        kw = dict(weight_dtype=wd, use_bias=cfg.moe_expert_bias, rngs=rngs)
        self.gate = GroupedLinear(n, e, m, ("exp", "embed", "mlp"), **kw)
        self.up = GroupedLinear(n, e, m, ("exp", "embed", "mlp"), **kw)
        self.down = GroupedLinear(n, m, e, ("exp", "mlp", "embed"), **kw)
        self.act = gated_activation(cfg)
        self.router_bias = (
            RouterBias(jnp.zeros((n,), jnp.float32), out_sharding=(None,), eager_sharding=False)
            if cfg.router_kind == "sigmoid_topk"
            else None
        )
        self.shared = (
            MLP(cfg, rngs=rngs, mlp_dim=m * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        bias = None if self.router_bias is None else self.router_bias[...]
        weights, experts, probs = route(logits, self.routing, bias)
        counts = expert_counts(experts, self.num_experts)
        scaled_input = self.routing.kind == "topk_sigmoid_input"
        if scaled_input:  # each assignment is its own row (token x its weight), added unweighted
            t, k = experts.shape
            tokens = (tokens[:, None, :] * weights[..., None].astype(tokens.dtype)).reshape(
                t * k, -1
            )
            experts, weights = experts.reshape(t * k, 1), jnp.ones_like(weights)
        ep = expert_parallel.plan(tokens.shape[0], self.num_experts, self.batch_axes)
        if ep is not None:  # context mesh with an `expert` axis > 1: see expert_parallel.py
            w = self.expert_weights(tokens.dtype)
            y_assign, dropped = ep(
                tokens, experts, w, self.act, self.matmul, self.capacity_factor, self.quant
            )
        elif self.capacity_factor is None:
            y_assign, dropped = self._dropless(tokens, experts), jnp.zeros((), jnp.float32)
        else:
            y_assign, dropped = self._with_capacity(tokens, experts)
        if scaled_input:
            y_assign = y_assign.reshape(*weights.shape, -1)
        y = jnp.einsum("tkd,tk->td", y_assign, weights.astype(y_assign.dtype))
        aux = {
            "moe_lb_loss": load_balancing_loss(probs, counts),
            "moe_z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
            "moe_tokens_per_expert": counts,
            "moe_dropped": dropped,
        }
        y = y.reshape(shape).astype(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, aux

    def expert_weights(self, dtype) -> ExpertWeights:
        """The stacked expert kernels in the compute dtype (read through GroupedLinear.weight, the
        LoRA / quantization hook)."""
        return ExpertWeights(
            self.gate.weight(dtype), self.up.weight(dtype), self.down.weight(dtype),
            self.gate.bias_of(dtype), self.up.bias_of(dtype), self.down.bias_of(dtype),
        )  # fmt: skip

    def _dropless(self, tokens, experts):
        """Sort assignments by expert, grouped matmuls, unsort -> [T, k, D]."""
        t, k = experts.shape
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        w = self.expert_weights(tokens.dtype)
        ys = sorted_expert_ffn(
            tokens[order // k], flat[order], sizes, w, self.act, self.matmul, self.quant
        )
        return jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)

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
        out = capacity_buffer_ffn(buf, self.expert_weights(tokens.dtype), self.act, self.quant)
        ys = out.at[flat, slot].get(mode="fill", fill_value=0)
        dropped = jnp.sum(~keep).astype(jnp.float32)
        return ys.reshape(t, k, -1), dropped
