"""The Llama 4 text fields of config.json <-> Config: NoPE layers, chunked attention on RoPE layers,
weightless QK norm, query temperature tuning on NoPE layers, MoE every `interleave_moe_layer_step`
layers with a shared expert and top-k sigmoid routing that scales the expert input. Defaults for
absent fields are those of transformers' Llama4TextConfig."""

from __future__ import annotations

from typing import Any

from llm_convert.errors import ConversionError, require_values
from llm_core import Config


def _nope_interval(no_rope_layers: list[int], source: str) -> int:
    """transformers' `no_rope_layers[i]` is 1 where layer i uses RoPE; ours is an interval."""
    nope = [i for i, use_rope in enumerate(no_rope_layers) if not use_rope]
    if not nope:
        return 0
    n = nope[0] + 1
    if nope != [i for i in range(len(no_rope_layers)) if (i + 1) % n == 0]:
        raise ConversionError(
            f"{source}: no_rope_layers {no_rope_layers} is not 'every {n}th layer without RoPE'."
        )
    return n


def llama4_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    layers = int(hf["num_hidden_layers"])
    interval = int(hf.get("no_rope_layer_interval", 4))
    no_rope_layers = hf.get("no_rope_layers") or [
        int((i + 1) % interval != 0) for i in range(layers)
    ]
    nope = _nope_interval(no_rope_layers, source)
    chunk = hf.get("attention_chunk_size", 8192)
    layer_types = hf.get("layer_types")
    if layer_types:
        expected = [
            "chunked_attention" if use and chunk is not None else "full_attention"
            for use in no_rope_layers
        ]
        if list(layer_types) != expected:
            raise ConversionError(
                f"{source}: layer_types must be chunked_attention exactly on the RoPE layers."
            )
    step = int(hf.get("interleave_moe_layer_step", 1))
    moe_layers = hf.get("moe_layers")
    if moe_layers is not None and list(moe_layers) != list(range(step - 1, layers, step)):
        raise ConversionError(
            f"{source}: moe_layers {moe_layers} is not every {step}th layer "
            "(interleave_moe_layer_step)."
        )
    if "intermediate_size_mlp" not in hf:
        raise ConversionError(f"{source}: config.json is missing 'intermediate_size_mlp'.")
    return dict(
        rope_interleave=True,
        nope_layer_interval=nope,
        attention_local_chunk=None if chunk is None else int(chunk),
        qk_l2_norm=bool(hf.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)),
        attn_floor_scale=float(hf.get("floor_scale", 8192)),
        attn_temperature_scale=float(hf.get("attn_scale", 0.1)),
        mlp_dim=int(hf["intermediate_size_mlp"]),
        ffn_kind="moe",
        num_experts=int(hf.get("num_local_experts", 16)),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 1)),
        moe_mlp_dim=int(hf["intermediate_size"]),
        moe_layer_interval=step,
        router_kind="topk_sigmoid_input",
        num_shared_experts=1,
        moe_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def llama4_to_hf(cfg: Config) -> dict[str, Any]:
    expected = {
        "ffn_kind": "moe", "router_kind": "topk_sigmoid_input", "num_shared_experts": 1,
        "first_num_dense_layers": 0, "mlp_only_layers": [], "rope_interleave": True,
        "attention_kind": "gqa",
    }  # fmt: skip
    require_values(cfg, expected, "llama4_text")
    n = cfg.nope_layer_interval
    rope = [int(n == 0 or (i + 1) % n != 0) for i in range(cfg.num_layers)]
    chunk = cfg.attention_local_chunk
    return dict(
        no_rope_layers=rope,
        no_rope_layer_interval=n or 4,
        attention_chunk_size=chunk,
        layer_types=[
            "chunked_attention" if use and chunk is not None else "full_attention" for use in rope
        ],
        use_qk_norm=cfg.qk_l2_norm,
        attn_temperature_tuning=cfg.attn_temperature_tuning,
        floor_scale=int(cfg.attn_floor_scale)
        if cfg.attn_floor_scale.is_integer()
        else cfg.attn_floor_scale,
        attn_scale=cfg.attn_temperature_scale,
        intermediate_size_mlp=cfg.mlp_dim,
        intermediate_size=cfg.resolved_moe_mlp_dim,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        interleave_moe_layer_step=cfg.moe_layer_interval,
        moe_layers=[i for i in range(cfg.num_layers) if (i + 1) % cfg.moe_layer_interval == 0],
        router_aux_loss_coef=cfg.moe_aux_loss_weight,
    )
