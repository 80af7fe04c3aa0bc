"""The mixture-of-experts fields of config.json (Mixtral, Qwen3-MoE) <-> llm-core Config.

Defaults for absent optional fields are those of transformers' config classes, so a folder loads as
transformers would load it.
"""

from __future__ import annotations

from typing import Any

from llm_convert.errors import ConversionError
from llm_core import Config

MOE_FAMILIES = ("mixtral", "qwen3_moe")


def _require(hf: dict, key: str, source: str) -> Any:
    if key not in hf:
        raise ConversionError(f"{source}: config.json is missing the field '{key}'.")
    return hf[key]


def moe_from_hf(hf: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """Config values for a Mixtral / Qwen3-MoE config.json."""
    aux = float(hf.get("router_aux_loss_coef", 0.001))
    if family == "mixtral":  # every layer MoE; the expert width is `intermediate_size`
        return dict(
            ffn_kind="moe",
            num_experts=int(_require(hf, "num_local_experts", source)),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            moe_mlp_dim=int(_require(hf, "intermediate_size", source)),
            norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top k
            moe_aux_loss_weight=aux,
        )
    # qwen3_moe: layer i is MoE unless i in mlp_only_layers or (i + 1) % decoder_sparse_step != 0;
    # dense layers use `intermediate_size`, experts `moe_intermediate_size`.
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))
    if num_experts is None:
        raise ConversionError(f"{source}: config.json is missing the field 'num_experts'.")
    return dict(
        ffn_kind="moe",
        num_experts=int(num_experts),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
        moe_mlp_dim=int(_require(hf, "moe_intermediate_size", source)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layer_interval=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []],
        moe_aux_loss_weight=aux,
    )


def moe_to_hf(cfg: Config, family: str) -> dict[str, Any]:
    """config.json fields for the MoE part of `cfg`; {} for a dense family. Refuses what the HF
    family cannot express."""
    if family not in MOE_FAMILIES:
        if cfg.ffn_kind == "moe":
            raise ConversionError(
                f"ffn_kind is 'moe' but the Hugging Face '{family}' family has no experts; "
                f"use model_family {' or '.join(MOE_FAMILIES)}."
            )
        return {}
    if cfg.ffn_kind != "moe":
        raise ConversionError(f"model_family '{family}' needs ffn_kind 'moe' for export.")
    common = dict(
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.moe_aux_loss_weight,
    )
    if family == "mixtral":
        dense = {
            "norm_topk_prob": (cfg.norm_topk_prob, True),
            "moe_layer_interval": (cfg.moe_layer_interval, 1),
            "mlp_only_layers": (list(cfg.mlp_only_layers), []),
            "first_num_dense_layers": (cfg.first_num_dense_layers, 0),
        }
        for key, (value, needed) in dense.items():
            if value != needed:
                raise ConversionError(
                    f"Mixtral in Hugging Face has only MoE layers with renormalised top-k weights: "
                    f"{key} must be {needed}, got {value}."
                )
        return {**common, "intermediate_size": cfg.resolved_moe_mlp_dim}
    # the first `first_num_dense_layers` layers are dense: say so through mlp_only_layers
    only = sorted(set(cfg.mlp_only_layers) | set(range(cfg.first_num_dense_layers)))
    return {
        **common,
        "num_experts": cfg.num_experts,  # the field name of transformers < 5 and Hub configs
        "intermediate_size": cfg.mlp_dim,
        "moe_intermediate_size": cfg.resolved_moe_mlp_dim,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": cfg.moe_layer_interval,
        "mlp_only_layers": only,
    }
