"""`init_from`: start a run from existing weights (a native checkpoint or a Hugging Face folder).

Only the parameters come from there; the optimizer state, step and data iterator start fresh. A
run that already has checkpoints of its own resumes those instead (an interrupted fine-tune
continues where it stopped). The configured model must have the same parameter tree and shapes
as the source; a mismatch names the first parameter that differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import llm_core
from llm_core import Config, ConfigError, lift_into_lora, strip_lora

# The config keys that define the function a set of parameters computes: they must agree between
# the source and the run, or the run would silently compute another model with the same shapes.
ARCH_KEYS = (
    "vocab_size", "emb_dim", "num_layers", "num_heads", "resolved_num_kv_heads",
    "resolved_head_dim", "mlp_dim", "mlp_activation", "gated_mlp", "norm_kind", "norm_eps",
    "norm_plus_one", "post_norms", "tie_embeddings", "scale_embeddings", "attention_bias",
    "mlp_bias", "position_embedding", "rope_kind", "rope_theta", "rope_local_theta",
    "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_position", "rope_yarn_beta_fast", "rope_yarn_beta_slow",
    "rope_yarn_attention_factor", "partial_rotary_factor", "sliding_window", "attention_pattern",
    "attn_logit_softcap", "final_logit_softcap", "qk_norm", "query_pre_attn_scalar", "ffn_kind",
    "first_num_dense_layers", "moe_layer_interval", "mlp_only_layers", "num_experts",
    "num_experts_per_tok", "resolved_moe_mlp_dim", "router_kind", "norm_topk_prob",
    "attention_kind", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "rope_interleave", "rope_yarn_mscale", "rope_yarn_mscale_all_dim",
    "moe_num_groups", "moe_topk_groups", "router_group_mask", "routed_scaling_factor",
    "num_shared_experts", "attention_sinks", "rope_yarn_truncate", "nope_layer_interval",
    "attention_local_chunk", "qk_l2_norm", "attn_temperature_tuning", "attn_floor_scale",
    "attn_temperature_scale", "moe_router_bias", "moe_expert_bias", "moe_gating", "swiglu_alpha",
    "swiglu_limit",
)  # fmt: skip


def check_architecture(source: Config, cfg: Config, path: str) -> None:
    """ConfigError listing every architecture key on which the run differs from the source."""
    diff = [
        f"{key.removeprefix('resolved_')}={getattr(cfg, key)!r} (source: {getattr(source, key)!r})"
        for key in ARCH_KEYS
        if getattr(cfg, key) != getattr(source, key)
    ]
    if diff:
        raise ConfigError(
            f"init_from={path!r}: the configured model differs from the source on "
            + ", ".join(diff)
            + ". Set these keys to the source's values (or drop init_from)."
        )


def _flat(tree: dict) -> dict[str, tuple[int, ...]]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def load_source(cfg: Config, path: str) -> tuple[Config, dict]:
    """The source's config and pure-dict parameters (`nnx.to_pure_dict` layout) at `path`."""
    root = Path(path)
    if (root / "config.yml").exists() and (root / "params").exists():
        model = llm_core.load(root)
    elif (root / "config.json").exists():
        try:
            from llm_convert import load_hf
        except ImportError:
            raise ConfigError(
                f"init_from={path!r} is a Hugging Face folder; loading it needs llm-convert "
                "(pip install packages/llm-convert)."
            ) from None
        model = load_hf(root, dtype=cfg.weight_dtype)
    else:
        raise ConfigError(
            f"init_from={path!r} is neither a native checkpoint (config.yml + params/) nor a "
            "Hugging Face folder (config.json + safetensors)."
            + ("" if os.path.exists(path) else " The path does not exist.")
        )
    return model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_compatible(source: dict, target: dict, path: str) -> None:
    """ConfigError naming the first parameter missing, extra or of another shape."""
    src, dst = _flat(source), _flat(target)
    for name, shape in dst.items():
        if name not in src:
            raise ConfigError(
                f"init_from={path!r} has no parameter {name!r} that the configured model needs: "
                "the model keys (layers, widths, ffn_kind, scan_layers, ...) must match the source."
            )
        if src[name] != shape:
            raise ConfigError(
                f"init_from={path!r}: parameter {name!r} has shape {src[name]}, the configured "
                f"model wants {shape}: the model keys must describe the source's architecture."
            )
    extra = sorted(set(src) - set(dst))
    if extra:
        raise ConfigError(
            f"init_from={path!r} holds parameters the configured model lacks (e.g. {extra[0]!r})."
        )


def state_from(steps, cfg: Config) -> dict:
    """A fresh train state (as `steps.init()`) whose parameters come from `cfg.init_from`. With
    LoRA the source fills the base weights and the adapters keep their fresh (identity) values."""
    from llm_train.step import _split_model

    source_cfg, source = load_source(cfg, cfg.init_from)
    check_architecture(source_cfg, cfg, cfg.init_from)
    state = steps.init()
    model = nnx.merge(steps.graphdef, state["params"], state["rest"])
    params = nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(params)
    check_compatible(source, strip_lora(target), cfg.init_from)
    dtypes = jax.tree.map(lambda a: a.dtype, strip_lora(target))
    # int8 (QLoRA) kernels are quantized from the float source by lift_into_lora
    source = jax.tree.map(
        lambda a, d: np.asarray(a).astype(np.float32 if d == np.int8 else d), source, dtypes
    )
    nnx.replace_by_pure_dict(params, lift_into_lora(source, target))
    nnx.update(model, params)
    _, trained, rest = _split_model(model)
    state["params"] = jax.device_put(trained, steps.state_sharding["params"])
    state["rest"] = jax.device_put(rest, steps.state_sharding["rest"])
    if "ref_params" in state:  # DPO's frozen reference starts from the same weights
        state["ref_params"] = jax.device_put(trained, steps.state_sharding["ref_params"])
    return state
