"""The GPT-OSS fields of config.json <-> Config: attention sinks, alternating sliding-window and full
layers, a router with a bias choosing the top k then a softmax over them, experts with biases and
the clamped SwiGLU. Defaults for absent fields are those of transformers' GptOssConfig."""

from __future__ import annotations

from typing import Any

from llm_convert.errors import ConversionError, require_values
from llm_core import Config


def gpt_oss_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
    ]
    kinds = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    pattern = kinds[:2] if len(kinds) > 1 else kinds
    if any(kinds[i] != pattern[i % len(pattern)] for i in range(len(kinds))):
        raise ConversionError(f"{source}: GPT-OSS layer_types must alternate, got {layer_types}.")
    if "num_local_experts" not in hf:
        raise ConversionError(f"{source}: config.json is missing the field 'num_local_experts'.")
    return dict(
        attention_sinks=True,
        attention_bias=bool(hf.get("attention_bias", True)),
        attention_pattern=pattern,
        sliding_window=int(hf.get("sliding_window") or 128),
        ffn_kind="moe",
        num_experts=int(hf["num_local_experts"]),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 4)),
        moe_mlp_dim=int(hf["intermediate_size"]),
        router_kind="topk_softmax",
        moe_router_bias=True,
        moe_expert_bias=True,
        moe_gating="clamped_swiglu",
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        moe_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def gpt_oss_to_hf(cfg: Config) -> dict[str, Any]:
    expected = {
        "attention_sinks": True, "ffn_kind": "moe", "router_kind": "topk_softmax",
        "moe_router_bias": True, "moe_expert_bias": True, "moe_gating": "clamped_swiglu",
        "first_num_dense_layers": 0, "moe_layer_interval": 1, "mlp_only_layers": [],
        "num_shared_experts": 0, "routed_scaling_factor": 1.0, "attention_kind": "gqa",
    }  # fmt: skip
    require_values(cfg, expected, "gpt_oss")
    kinds = cfg.layer_attention_kinds
    return dict(
        layer_types=["sliding_attention" if k == "local" else "full_attention" for k in kinds],
        sliding_window=cfg.sliding_window,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        intermediate_size=cfg.resolved_moe_mlp_dim,
        swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit,
        router_aux_loss_coef=cfg.moe_aux_loss_weight,
    )
