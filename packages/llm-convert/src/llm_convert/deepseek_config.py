"""The DeepSeek-V2/V3 fields of config.json (MLA dimensions, routing, shared experts) <-> Config.

Defaults for absent optional fields are those of transformers' config classes, so a folder loads as
transformers would load it. Two transformers behaviours are followed on purpose:
- DeepseekV2 ignores `norm_topk_prob` (its router never renormalises), so we load it as false;
- DeepseekV2's group-limited router masks dropped groups with 0.0, DeepseekV3's with -inf
  (`router_group_mask`: zero / neg_inf). The Hub's remote DeepSeek-V3 code used 0.0; the two differ
  only where every eligible biased score is <= 0 (see docs/llm-core.md).
"""

from __future__ import annotations

from typing import Any

from llm_convert.errors import ConversionError, require_values
from llm_core import Config

DEEPSEEK_FAMILIES = ("deepseek_v2", "deepseek_v3")


def _require(hf: dict, key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ConversionError(f"{source}: config.json is missing the field '{key}'.")
    return hf[key]


def deepseek_from_hf(hf: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    if hf.get("mlp_bias"):
        raise ConversionError(f"{source}: DeepSeek with mlp_bias=true is not supported.")
    nope = int(_require(hf, "qk_nope_head_dim", source))
    rope = int(_require(hf, "qk_rope_head_dim", source))
    v3 = family == "deepseek_v3"
    values: dict[str, Any] = dict(
        attention_kind="mla",
        q_lora_rank=int(hf.get("q_lora_rank") or 0),
        kv_lora_rank=int(_require(hf, "kv_lora_rank", source)),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(_require(hf, "v_head_dim", source)),
        head_dim=nope + rope,
        num_kv_heads=int(_require(hf, "num_attention_heads", source)),
        rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True,
        ffn_kind="moe",
        num_experts=int(_require(hf, "n_routed_experts", source)),
        num_experts_per_tok=int(_require(hf, "num_experts_per_tok", source)),
        moe_mlp_dim=int(_require(hf, "moe_intermediate_size", source)),
        num_shared_experts=int(hf.get("n_shared_experts") or 0),
        first_num_dense_layers=int(hf.get("first_k_dense_replace") or 0),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5 if v3 else 1.0)),
    )
    if v3:
        values.update(
            router_kind="sigmoid_topk",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            moe_num_groups=int(hf.get("n_group") or 1),
            moe_topk_groups=int(hf.get("topk_group") or 1),
            router_group_mask="neg_inf",
        )
        return values
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConversionError(
            f"{source}: DeepSeek-V2 topk_method '{method}' is not supported "
            "(greedy, group_limited_greedy)."
        )
    grouped = method == "group_limited_greedy"
    values.update(
        router_kind="softmax_topk",
        norm_topk_prob=False,  # transformers' DeepseekV2 router never renormalises
        moe_num_groups=int(_require(hf, "n_group", source)) if grouped else 1,
        moe_topk_groups=int(_require(hf, "topk_group", source)) if grouped else 1,
        router_group_mask="zero",
    )
    return values


def deepseek_to_hf(cfg: Config, family: str) -> dict[str, Any]:
    v3 = family == "deepseek_v3"
    if cfg.mtp_num_layers and not v3:
        raise ConversionError("transformers' deepseek_v2 has no multi-token prediction modules.")
    if cfg.attention_kind != "mla" or cfg.ffn_kind != "moe":
        raise ConversionError(
            f"model_family '{family}' needs attention_kind 'mla' and ffn_kind 'moe' for export."
        )
    expected = {
        "router_kind": "sigmoid_topk" if v3 else "softmax_topk",
        "moe_layer_interval": 1,
        "mlp_only_layers": [],
    }
    if not v3:
        expected["norm_topk_prob"] = False
        if cfg.moe_num_groups > 1:
            expected["router_group_mask"] = "zero"
    else:
        expected["router_group_mask"] = "neg_inf"
    require_values(cfg, expected, family)
    out: dict[str, Any] = dict(
        q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        head_dim=cfg.qk_rope_head_dim,
        num_key_value_heads=cfg.num_heads,
        n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.resolved_moe_mlp_dim,
        n_shared_experts=cfg.num_shared_experts,
        first_k_dense_replace=cfg.first_num_dense_layers,
        routed_scaling_factor=cfg.routed_scaling_factor,
        norm_topk_prob=cfg.norm_topk_prob,
    )
    if v3:
        out.update(
            n_group=cfg.moe_num_groups,
            topk_group=cfg.moe_topk_groups,
            rope_interleave=cfg.rope_interleave,
            num_nextn_predict_layers=cfg.mtp_num_layers,
        )
    else:
        if not cfg.rope_interleave:
            raise ConversionError("transformers' deepseek_v2 always uses rope_interleave=true.")
        grouped = cfg.moe_num_groups > 1
        out.update(
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=cfg.moe_num_groups if grouped else None,
            topk_group=cfg.moe_topk_groups if grouped else None,
        )
    return out
