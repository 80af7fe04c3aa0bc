"""Hugging Face config.json <-> llm-core Config, per family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_convert.deepseek_config import DEEPSEEK_FAMILIES, deepseek_from_hf, deepseek_to_hf
from llm_convert.errors import ConversionError
from llm_convert.families import FAMILIES, Family, family_for_model_type
from llm_convert.gpt_oss_config import gpt_oss_from_hf, gpt_oss_to_hf
from llm_convert.llama4_config import llama4_from_hf, llama4_to_hf
from llm_convert.moe_config import MOE_FAMILIES, moe_from_hf, moe_to_hf
from llm_core import Config, ConfigError, load_config

ACTIVATIONS = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


# multimodal wrappers whose language model converts: model_type -> (its text model_type, the prefix
# of the text model's tensors); the other tensors (vision encoder, projector) are left out
MULTIMODAL_TEXT = {"llama4": ("llama4_text", "language_model.")}


def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise ConversionError(
            f"{path} not found: SRC must be a Hugging Face model folder with config.json."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json; for a multimodal wrapper in MULTIMODAL_TEXT (Llama 4's
    Llama4ForConditionalGeneration), its language model's `text_config`."""
    hf = _read_json(folder)
    wrapped = MULTIMODAL_TEXT.get(hf.get("model_type"))
    if wrapped is None or not isinstance(hf.get("text_config"), dict):
        return hf
    text = {**hf["text_config"], "model_type": wrapped[0]}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    return text


def tensor_prefix(folder: Path) -> str:
    """The prefix of the language model's tensor names ('' unless a multimodal wrapper)."""
    hf = _read_json(folder)
    wrapped = MULTIMODAL_TEXT.get(hf.get("model_type"))
    return wrapped[1] if wrapped and isinstance(hf.get("text_config"), dict) else ""


def _require(hf: dict, key: str, path: str) -> Any:
    if key not in hf:
        raise ConversionError(f"{path}: config.json is missing the field '{key}'.")
    return hf[key]


def _rope(params: dict | None, prefix: str = "") -> dict[str, Any]:
    params = dict(params or {})
    out: dict[str, Any] = {}
    kind = params.get("rope_type", params.get("type", "default"))
    if "rope_theta" in params:
        out["rope_theta"] = float(params["rope_theta"])
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ConversionError(
            f"config.json: rope_type '{kind}' is not supported (default, linear, llama3, yarn)."
        )
    out["rope_kind"] = kind
    if kind != "default" and params.get("factor") is not None:
        out["rope_scaling_factor"] = float(params["factor"])
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position"] = int(params["original_max_position_embeddings"])
    if kind == "yarn":
        out["rope_original_max_position"] = int(
            params.get("original_max_position_embeddings", 4096)
        )
        out["rope_yarn_beta_fast"] = float(params.get("beta_fast", 32.0))
        out["rope_yarn_beta_slow"] = float(params.get("beta_slow", 1.0))
        if params.get("attention_factor") is not None:
            out["rope_yarn_attention_factor"] = float(params["attention_factor"])
        if params.get("factor") is None:  # transformers: max_position / original (DeepSeek-V3)
            out["rope_scaling_factor"] = None
        if params.get("truncate", True) is False:
            out["rope_yarn_truncate"] = False
    if kind != "default":  # DeepSeek: also scales MLA's softmax (llm_core.layers.mla)
        for key in ("mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                out[f"rope_yarn_{key}"] = float(params[key])
    return out


def config_from_hf(
    hf: dict[str, Any], source: str = "config.json", overrides=()
) -> tuple[Config, Family]:
    try:
        family = family_for_model_type(_require(hf, "model_type", source))
    except ConversionError as err:
        raise ConversionError(f"{source}: {err}") from None
    values: dict[str, Any] = {"model_family": family.name, "model_name": "default"}
    if family.name == "gpt3":
        e, h = _require(hf, "n_embd", source), _require(hf, "n_head", source)
        values.update(
            vocab_size=_require(hf, "vocab_size", source),
            emb_dim=e,
            num_layers=_require(hf, "n_layer", source),
            num_heads=h,
            num_kv_heads=h,
            head_dim=e // h,
            mlp_dim=hf.get("n_inner") or 4 * e,
            mlp_activation=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
            gated_mlp=False,
            norm_kind="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            position_embedding="learned",
            attention_bias=True,
            mlp_bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_position_embeddings=_require(hf, "n_positions", source),
        )
    else:
        h = _require(hf, "num_attention_heads", source)
        e = _require(hf, "hidden_size", source)
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        values.update(
            vocab_size=_require(hf, "vocab_size", source),
            emb_dim=e,
            num_layers=_require(hf, "num_hidden_layers", source),
            num_heads=h,
            num_kv_heads=hf.get("num_key_value_heads") or h,
            head_dim=hf.get("head_dim") or e // h,
            mlp_dim=_require(hf, "intermediate_size", source),
            mlp_activation=ACTIVATIONS[act],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=_require(hf, "max_position_embeddings", source),
            attention_bias=bool(hf.get("attention_bias", False)),
        )
        rope = hf.get("rope_parameters") or {
            "rope_theta": hf.get("rope_theta", 10000.0),
            **(hf.get("rope_scaling") or {}),
        }
        if family.name == "gemma3":
            values.update(_rope(rope.get("full_attention", rope)))
            values["rope_local_theta"] = float(
                rope.get("sliding_attention", {}).get(
                    "rope_theta", hf.get("rope_local_base_freq", 10000.0)
                )
            )
        else:
            values.update(_rope(rope))
        if hf.get("partial_rotary_factor"):
            values["partial_rotary_factor"] = float(hf["partial_rotary_factor"])
        if family.name in ("mistral", "mixtral") and hf.get("sliding_window"):
            values["sliding_window"] = int(hf["sliding_window"])
        if family.name in ("gemma", "gemma2", "gemma3"):
            values.update(norm_plus_one=True, scale_embeddings=True)
        if family.name in ("qwen3", "qwen3_moe"):
            values["qk_norm"] = True
            if hf.get("use_sliding_window") and hf.get("sliding_window"):
                raise ConversionError(
                    f"{source}: Qwen3 with use_sliding_window=true is not supported yet."
                )
        if values.get("rope_scaling_factor", 1.0) is None:
            values["rope_scaling_factor"] = values["max_position_embeddings"] / values.get(
                "rope_original_max_position", 4096
            )
        if family.name in MOE_FAMILIES:
            values.update(moe_from_hf(hf, family.name, source))
        if family.name in DEEPSEEK_FAMILIES:
            values.update(deepseek_from_hf(hf, family.name, source))
        if family.name == "gpt_oss":
            values.update(gpt_oss_from_hf(hf, source))
        if family.name == "llama4":
            values.update(llama4_from_hf(hf, source))
        if family.name in ("gemma2", "gemma3"):
            layer_types = hf.get("layer_types")
            if layer_types:
                kinds = ["local" if t == "sliding_attention" else "global" for t in layer_types]
                period = 2 if family.name == "gemma2" else int(hf.get("_sliding_window_pattern", 6))
                pattern = kinds[:period]
                if any(kinds[i] != pattern[i % period] for i in range(len(kinds))):
                    raise ConversionError(
                        f"{source}: layer_types do not repeat with period {period}."
                    )
            else:
                pattern = (
                    ["local", "global"] if family.name == "gemma2" else ["local"] * 5 + ["global"]
                )
            values.update(
                post_norms=True,
                attention_pattern=pattern,
                sliding_window=int(_require(hf, "sliding_window", source)),
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or values["head_dim"]),
                attn_logit_softcap=hf.get("attn_logit_softcapping"),
                final_logit_softcap=hf.get("final_logit_softcapping"),
            )
            if family.name == "gemma3":
                values["qk_norm"] = True
    values["seq_len"] = min(256, values["max_position_embeddings"])
    from llm_core.config import parse_overrides

    extra = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    try:
        return load_config(None, {**values, **extra}), family
    except ConfigError as err:  # e.g. top-k above the expert count: name the file and the key
        raise ConversionError(f"{source}: {err}") from None


def config_to_hf(cfg: Config, dtype: str) -> dict[str, Any]:
    family = FAMILIES[cfg.model_family]
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[
        cfg.mlp_activation
    ]
    if family.name in DEEPSEEK_FAMILIES:
        moe = deepseek_to_hf(cfg, family.name)
    elif family.name == "gpt_oss":
        moe = gpt_oss_to_hf(cfg)
    elif family.name == "llama4":
        moe = llama4_to_hf(cfg)
    else:
        moe = moe_to_hf(cfg, family.name)  # {} for dense families (refuses MoE configs there)
    if family.name == "gpt3":
        return {
            "architectures": [family.architecture],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.emb_dim,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new"
            if cfg.mlp_activation == "gelu_tanh"
            else cfg.mlp_activation,
            "tie_word_embeddings": cfg.tie_embeddings,
            "dtype": torch_dtype,
        }
    rope: dict[str, Any] = {"rope_type": cfg.rope_kind, "rope_theta": cfg.rope_theta}
    if cfg.rope_kind != "default":
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_kind == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    if cfg.rope_kind == "yarn":
        rope.update(
            original_max_position_embeddings=cfg.rope_original_max_position,
            beta_fast=cfg.rope_yarn_beta_fast,
            beta_slow=cfg.rope_yarn_beta_slow,
        )
        if cfg.rope_yarn_attention_factor is not None:
            rope["attention_factor"] = cfg.rope_yarn_attention_factor
        if not cfg.rope_yarn_truncate:
            rope["truncate"] = False
    if cfg.rope_kind != "default":
        if cfg.rope_yarn_mscale is not None:
            rope["mscale"] = cfg.rope_yarn_mscale
        if cfg.rope_yarn_mscale_all_dim is not None:
            rope["mscale_all_dim"] = cfg.rope_yarn_mscale_all_dim
    out: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.resolved_num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "rope_parameters": rope,
        "dtype": torch_dtype,
    }
    out["hidden_activation" if family.name in ("gemma2", "gemma3") else "hidden_act"] = act
    out.update(moe)
    if family.name in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window
    if family.name in ("gemma2", "gemma3"):
        kinds = cfg.layer_attention_kinds
        out.update(
            layer_types=["sliding_attention" if k == "local" else "full_attention" for k in kinds],
            sliding_window=cfg.sliding_window,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar,
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
        )
    if family.name == "gemma3":
        out["rope_parameters"] = {
            "full_attention": rope,
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": cfg.rope_local_theta or 10000.0,
            },
        }
        out["_sliding_window_pattern"] = len(cfg.attention_pattern or [1])
    return out
