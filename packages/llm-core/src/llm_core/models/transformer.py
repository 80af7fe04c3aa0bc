"""The decoder skeleton shared by every family.

Each layer is a composition of kinds chosen per layer from config (`llm_core.models.placement`):
attention (with or without a sliding window) and a dense or MoE feed-forward. The placement puts
layers into segments: stacked groups of the repeating kind tuple, run with `lax.scan`
(`scan_layers=True`) or a Python loop over the same stacked parameters (`scan_layers=False`), and an
unstacked tail of left-over layers. Checkpoints are identical either way.

One forward serves training and serving: `forward(ids, positions, segment_ids, cache)` returns
(float32 logits, the updated cache or None, auxiliary outputs). Caches come from `init_cache` and are
owned by the attention layers; the forward threads them through the scan without looking inside.
`unstack_layers(model)` gives a decode view of the same parameters (one array per layer group, no
weight copies out of a stacked array per step) for memory-bound CPU decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_core.layers.attention import Attention
from llm_core.layers.attention_ops import context_size, load_balanced_order
from llm_core.layers.embeddings import Embedder
from llm_core.layers.expert_parallel import batch_axes
from llm_core.layers.kv_cache import stack_cache
from llm_core.layers.linear import Linear
from llm_core.layers.mla import MLAttention
from llm_core.layers.mlp import MLP
from llm_core.layers.moe import MoE, empty_aux
from llm_core.layers.norms import make_norm
from llm_core.layers.params import dtype_of
from llm_core.layers.sequence_parallel import gather_sequence, sequence_size, split_sequence
from llm_core.layers.sequence_parallel import remat_policy as sp_remat_policy
from llm_core.models import pipeline
from llm_core.models.placement import LayerKind, Segment, layer_kinds, layer_placement

REMAT_POLICIES = {  # None: save nothing
    "none": jax.checkpoint_policies.everything_saveable,
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


ATTENTION_KINDS = {"gqa": Attention, "mla": MLAttention}


def _add(a: dict, b: dict) -> dict:
    """Sum two aux dicts of summed statistics (per-layer `router_load` is collected separately)."""
    return b if not a else {key: a[key] + b[key] for key in a}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, kind: LayerKind, rngs: nnx.Rngs):
        self.cfg = cfg
        self.moe = kind.ffn == "moe"
        self.batch_axes = batch_axes(cfg.logical_axis_rules)
        self.pre_attn_norm = make_norm(cfg, rngs=rngs)
        self.attn = ATTENTION_KINDS[kind.attention](cfg, kind, rngs=rngs)
        self.pre_mlp_norm = make_norm(cfg, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs) if self.moe else MLP(cfg, rngs=rngs)
        if cfg.post_norms:
            self.post_attn_norm = make_norm(cfg, rngs=rngs)
            self.post_mlp_norm = make_norm(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids=None, cache=None):
        """Returns (x, new cache or None, aux dict: empty for dense-only models)."""
        # sequence parallelism: norms and residuals split over `sequence`, matmuls gathered
        rows = self.batch_axes
        x = split_sequence(x, rows)
        h, cache = self.attn(
            gather_sequence(self.pre_attn_norm(x), rows), positions, segment_ids, cache
        )
        h = split_sequence(h, rows)
        if self.cfg.post_norms:
            h = self.post_attn_norm(h)
        x = x + h
        if self.moe:
            h, aux = self.mlp(gather_sequence(self.pre_mlp_norm(x), rows))
        else:
            h = self.mlp(gather_sequence(self.pre_mlp_norm(x), rows))
            aux = empty_aux(self.cfg) if self.cfg.ffn_kind == "moe" else {}
        h = split_sequence(h, rows)
        if self.cfg.post_norms:
            h = self.post_mlp_norm(h)
        return x + h, cache, aux


class LayerGroup(nnx.Module):
    """Consecutive layers of the given kinds; the unit that is stacked and scanned."""

    def __init__(self, cfg, kinds: tuple[LayerKind, ...], rngs: nnx.Rngs):
        self.size = len(kinds)
        for j, kind in enumerate(kinds):
            setattr(self, f"layer_{j}", DecoderLayer(cfg, kind, rngs=rngs))

    def __call__(self, x, positions, segment_ids=None, caches=None):
        """caches: a tuple of one cache per layer, or None. Returns (x, caches, summed aux); with
        aux-loss-free balancing, aux["router_load"] = {layer_j: tokens per expert} of each MoE layer
        (kept per layer: each has its own router bias)."""
        new, aux, loads = [], {}, {}
        for j in range(self.size):
            cache = None if caches is None else caches[j]
            layer = getattr(self, f"layer_{j}")
            x, cache, layer_aux = layer(x, positions, segment_ids, cache)
            new.append(cache)
            aux = _add(aux, layer_aux)
            if layer.moe and layer.cfg.router_bias_update_rate > 0:
                loads[f"layer_{j}"] = layer_aux["moe_tokens_per_expert"]
        if loads:
            aux["router_load"] = loads
        return x, (None if caches is None else tuple(new)), aux


class MTPBlock(nnx.Module):
    """One multi-token-prediction module (DeepSeek-V3): the previous depth's hidden state and the
    embedding of the next input token, each normalised, concatenated and projected (`eh_proj`),
    then one decoder layer; its output, normalised by `norm`, goes to the shared output head.
    (HF: model.layers.{num_layers + k}.{enorm, hnorm, eh_proj, shared_head.norm, <layer>}.)"""

    def __init__(self, cfg, kind: LayerKind, rngs: nnx.Rngs):
        e = cfg.emb_dim
        self.enorm = make_norm(cfg, rngs=rngs)
        self.hnorm = make_norm(cfg, rngs=rngs)
        self.eh_proj = Linear(
            2 * e, e, (None, "embed"), weight_dtype=dtype_of(cfg.weight_dtype), rngs=rngs
        )
        self.layer = DecoderLayer(cfg, kind, rngs=rngs)
        self.norm = make_norm(cfg, rngs=rngs)

    def __call__(self, previous, next_embedded, positions, segment_ids=None):
        """Returns (x, the layer's aux dict)."""
        x = jnp.concatenate([self.enorm(next_embedded), self.hnorm(previous)], axis=-1)
        x, _, aux = self.layer(self.eh_proj(x), positions, segment_ids)
        return x, aux


def _build_segment(cfg, seg: Segment, rngs: nnx.Rngs) -> LayerGroup:
    if not seg.stacked:
        return LayerGroup(cfg, seg.kinds, rngs=rngs)

    @nnx.split_rngs(splits=seg.repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_groups(rngs: nnx.Rngs) -> LayerGroup:
        return LayerGroup(cfg, seg.kinds, rngs=rngs)

    return make_groups(rngs)


class Transformer(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.placement = layer_placement(cfg)
        self.embedder = Embedder(cfg, rngs=rngs)
        for seg in self.placement.segments:
            setattr(self, seg.name, _build_segment(cfg, seg, rngs))
        self.final_norm = make_norm(cfg, rngs=rngs)
        for k in range(cfg.mtp_num_layers):  # the kind of the last decoder layer
            setattr(self, f"mtp_{k}", MTPBlock(cfg, layer_kinds(cfg)[-1], rngs=rngs))
        wd = dtype_of(cfg.weight_dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.emb_dim,
                cfg.vocab_size,
                ("embed", "vocab"),
                weight_dtype=wd,
                out_dtype=jnp.float32,
                rngs=rngs,
            )
        )

    # ------------------------------------------------------------------ public API
    def __call__(self, input_ids, positions=None, segment_ids=None):
        """int32 [B, S] -> float32 logits [B, S, V]. Packed sequences: pass per-segment positions and
        segment_ids (tokens attend only within their segment)."""
        return self.forward(input_ids, positions, segment_ids)[0]

    def forward(self, input_ids, positions=None, segment_ids=None, cache=None):
        """-> (float32 logits [B, S, V], updated cache or None, aux). With a cache, the new tokens'
        K/V are written at `positions` (positions beyond the cache are dropped: use them for padding)
        and attention reads the cache. aux (MoE models): `moe_lb_loss` and `moe_z_loss` averaged over
        the MoE layers, `moe_tokens_per_expert` [experts] and `moe_dropped` summed over them, and
        with `router_bias_update_rate` > 0 `router_load`: each MoE layer's tokens per expert, in a
        tree shaped like the layers' `router_bias` parameters."""
        x, new_cache, aux = self.hidden(input_ids, positions, segment_ids, cache)
        return self.logits(x), new_cache, aux

    def hidden(self, input_ids, positions=None, segment_ids=None, cache=None):
        """`forward` without the head: (hidden states after the last layer [B, S, E], before the
        final norm; cache; aux). For losses that apply `logits` chunk by chunk (vocab tiling)."""
        if positions is None:
            positions = jnp.broadcast_to(
                jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
            )
        x = self.embedder.encode(input_ids, positions, dtype_of(self.cfg.dtype))
        order = None
        if self.cfg.context_parallel_load_balance and cache is None:
            order = load_balanced_order(x.shape[1], context_size())
        if order is not None:  # positions travel with the tokens, so every mask stays exact
            x, positions = x[:, order], positions[:, order]
            segment_ids = None if segment_ids is None else segment_ids[:, order]
        new_cache, aux, loads = {}, {}, {}
        for seg in self.placement.segments:
            seg_cache = None if cache is None else cache[seg.name]
            x, seg_cache, seg_aux = self._run_segment(seg, x, positions, segment_ids, seg_cache)
            new_cache[seg.name] = seg_cache
            if "router_load" in seg_aux:
                loads[seg.name] = seg_aux.pop("router_load")
            aux = _add(aux, seg_aux)
        aux = self._finish_aux(aux)
        if order is not None:
            x = x[:, np.argsort(order)]
        if loads:  # {segment: {layer_j: [groups, experts] or [experts]}}, shaped like the biases
            aux["router_load"] = loads
        return x, (None if cache is None else new_cache), aux

    def forward_with_cache(self, input_ids, positions, cache):
        """Serving path: (logits, cache) of `forward` with a cache."""
        logits, cache, _ = self.forward(input_ids, positions, None, cache)
        return logits, cache

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype=None,
        *,
        kind: str = "contiguous",
        num_pages: int = 0,
        page_size: int = 16,
    ) -> dict:
        """An empty cache for every layer (`contiguous`, or `paged` over a pool of `num_pages`)."""
        dtype = dtype or dtype_of(self.cfg.dtype)
        cache = {}
        for seg in self.placement.segments:

            def one(seg=seg):
                return tuple(
                    ATTENTION_KINDS[layer.attention].init_cache(
                        self.cfg,
                        batch_size,
                        max_len,
                        dtype,
                        kind=kind,
                        num_pages=num_pages,
                        page_size=page_size,
                    )
                    for layer in seg.kinds
                )

            module = getattr(self, seg.name)
            if isinstance(module, nnx.List):
                cache[seg.name] = [one() for _ in range(seg.repeats)]
            elif seg.stacked:
                cache[seg.name] = stack_cache(one(), seg.repeats)
            else:
                cache[seg.name] = one()
        return cache

    def logits(self, x):
        """Hidden states [B,S,E] after the last layer -> final norm, head, soft-cap: float32 logits."""
        return self._head(self.final_norm(x))

    def mtp_hidden(self, hidden, input_ids, positions, segment_ids=None, loads=None) -> list:
        """The multi-token-prediction modules' outputs [B, S, E] (before their norms), one per
        depth: at position i, depth k (0-based) predicts input token i + k + 2, i.e.
        targets[:, i + k + 1]. `hidden` is `self.hidden(...)`'s output for the same inputs.
        `loads` (a dict): filled with {"mtp_k": {"layer": tokens per expert}} for MoE modules under
        aux-loss-free balancing, merged into aux["router_load"] so their router biases move too."""
        h, outs = self.final_norm(hidden), []
        dtype = dtype_of(self.cfg.dtype)
        for k in range(self.cfg.mtp_num_layers):
            ahead = jnp.pad(input_ids[:, k + 1 :], ((0, 0), (0, k + 1)))  # token i + k + 1
            block = getattr(self, f"mtp_{k}")
            h, aux = block(h, self.embedder.encode(ahead, positions, dtype), positions, segment_ids)
            if loads is not None and block.layer.moe and self.cfg.router_bias_update_rate > 0:
                loads[f"mtp_{k}"] = {"layer": aux["moe_tokens_per_expert"]}
            outs.append(h)
        return outs

    def mtp_logits(self, depth: int, h):
        """float32 logits of depth `depth`'s output (its own norm, the shared head)."""
        return self._head(getattr(self, f"mtp_{depth}").norm(h))

    def _head(self, x):
        logits = self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    # ------------------------------------------------------------------ internals
    def _finish_aux(self, aux: dict) -> dict:
        if not aux:
            return {}
        n_moe = sum(
            k.ffn == "moe" for seg in self.placement.segments for k in seg.kinds * seg.repeats
        )
        n_moe = max(n_moe, 1)
        return {
            **aux,
            "moe_lb_loss": aux["moe_lb_loss"] / n_moe,
            "moe_z_loss": aux["moe_z_loss"] / n_moe,
        }

    def _run_segment(self, seg: Segment, x, positions, segment_ids, cache):
        module = getattr(self, seg.name)
        if isinstance(module, nnx.List):  # decode view: one module per group
            new, aux = [], {}
            for i, group in enumerate(module):
                x, c, a = group(x, positions, segment_ids, None if cache is None else cache[i])
                new.append(c)
                a.pop("router_load", None)  # decode view: serving has no use for it
                aux = _add(aux, a)
            return x, (None if cache is None else new), aux
        graphdef, state = nnx.split(module)

        def group(group_state, x, positions, segment_ids, group_cache=None):
            x, group_cache, aux = nnx.merge(graphdef, group_state)(
                x, positions, segment_ids, group_cache
            )
            return x, (group_cache, aux)

        remat = self.cfg.remat_policy
        if remat != "none" or (cache is None and sequence_size() > 1):
            policy = None if remat == "full" else sp_remat_policy(REMAT_POLICIES[remat])
            group = jax.checkpoint(group, policy=policy, prevent_cse=False)
        if not seg.stacked:
            x, (cache, aux) = group(state, x, positions, segment_ids, cache)
            return x, cache, aux
        if pipeline.stage_count() > 1:  # pipeline parallelism (models/pipeline.py)
            if cache is not None:
                raise ValueError("a KV cache under a `stage` mesh axis > 1: decode without one")

            def without_cache(group_state, x, positions, segment_ids):
                x, (_, aux) = group(group_state, x, positions, segment_ids)
                return x, aux

            x, aux = pipeline.run_pipelined(
                without_cache, state, x, positions, segment_ids,
                microbatches=self.cfg.num_pipeline_microbatches or pipeline.stage_count(),
                repeats=self.cfg.num_pipeline_repeats,
                batch_axes=batch_axes(self.cfg.logical_axis_rules),
            )  # fmt: skip
            return x, None, aux

        def body(x, xs):
            group_state, group_cache = xs
            return group(group_state, x, positions, segment_ids, group_cache)

        if self.cfg.scan_layers:
            x, (cache, aux) = jax.lax.scan(body, x, (state, cache))
        else:
            outs = []
            for i in range(seg.repeats):
                x, out = body(x, jax.tree.map(lambda a, i=i: a[i], (state, cache)))
                outs.append(out)
            cache, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        loads = aux.pop("router_load", None)
        aux = jax.tree.map(lambda a: a.sum(0), aux)
        if loads is not None:
            aux["router_load"] = loads  # stacked [repeats, experts], like the stacked biases
        return x, cache, aux


def unstack_layers(model: Transformer) -> Transformer:
    """A decode view of `model`: each stacked segment becomes a list of per-group modules holding
    their own arrays (copies), so a memory-bound decode step reads every weight once instead of first
    slicing it out of the stack. Same forward, same results; its caches follow its layout."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    for seg in model.placement.segments:
        if not seg.stacked:
            continue
        gdef, stacked = nnx.split(getattr(model, seg.name))
        groups = [
            nnx.merge(gdef, jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked))
            for i in range(seg.repeats)
        ]
        setattr(view, seg.name, nnx.List(groups))
    return view


def build_model(cfg, *, rngs: nnx.Rngs) -> Transformer:
    """A randomly initialised model for `cfg` (weights in cfg.weight_dtype), with int8 / int4 Linear
    modules under `weight_quantization`, quantized training matmuls under `quantization`
    (qwix, layers/qat.py) and LoRA adapters around the `lora_targets` Linear modules when
    `lora_rank` > 0."""
    model = Transformer(cfg, rngs=rngs)
    if cfg.weight_quantization != "none":
        from llm_core.config import ConfigError
        from llm_core.layers.quantize import GroupSizeError, quantize_linears

        try:
            quantize_linears(model, cfg.weight_quantization, cfg.weight_quantization_group_size)
        except GroupSizeError as err:
            raise ConfigError(str(err)) from None
    if cfg.quantization != "none":
        from llm_core.layers.qat import quantize_for_training

        model = quantize_for_training(model, cfg)
    if cfg.lora_rank > 0:
        from llm_core.layers.lora import apply_lora

        int8_base = cfg.lora_base_quantization == "int8"
        n = apply_lora(
            model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, rngs, int8_base,
            dropout=cfg.lora_dropout, experts=cfg.lora_experts,
        )  # fmt: skip
        if n == 0:
            from llm_core.config import ConfigError

            raise ConfigError(
                f"lora_targets={cfg.lora_targets!r} matches no Linear module; module paths look "
                "like groups/layer_0/attn/q, groups/layer_0/mlp/down, lm_head."
            )
    return model
