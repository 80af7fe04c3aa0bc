"""One declarative mapping table per family: Hugging Face tensor name -> native parameter path.

Layer entries use `{i}` for the layer index. Native paths are relative to a decoder layer; the generic
loader places layer i into the stacked `groups` (index i // group, slot i % group) or into `tail`.
GPT-2's fused qkv (`c_attn`) is split by `Split` entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_convert.errors import ConversionError
from llm_convert.transforms import (
    CONV1D,
    CONV1D_OUT_HEADS,
    FLAT,
    IDENTITY,
    LINEAR_IN,
    LINEAR_OUT_HEADS,
    Transform,
)


@dataclass(frozen=True)
class Entry:
    hf: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    native: tuple[str, ...]  # e.g. ("attn", "q") inside a layer, or a global path
    transform: Transform = IDENTITY
    split: tuple[int, int] | None = (
        None  # (part, parts): slice `part` of `parts` along the last HF axis
    )


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architecture: str
    globals: tuple[Entry, ...]
    layer: tuple[Entry, ...]
    ignore_suffixes: tuple[str, ...] = ()


def _llama_like(name, model_types, arch, qk_norm=False, gemma_norms=False, bias=False) -> Family:
    p = "model.layers.{i}."
    layer = [
        Entry(p + "self_attn.q_proj.weight", ("attn", "q"), LINEAR_IN),
        Entry(p + "self_attn.k_proj.weight", ("attn", "k"), LINEAR_IN),
        Entry(p + "self_attn.v_proj.weight", ("attn", "v"), LINEAR_IN),
        Entry(p + "self_attn.o_proj.weight", ("attn", "o"), LINEAR_OUT_HEADS),
        Entry(p + "mlp.gate_proj.weight", ("mlp", "gate"), LINEAR_IN),
        Entry(p + "mlp.up_proj.weight", ("mlp", "up"), LINEAR_IN),
        Entry(p + "mlp.down_proj.weight", ("mlp", "down"), LINEAR_IN),
        Entry(p + "input_layernorm.weight", ("pre_attn_norm", "scale")),
    ]
    if bias:
        layer += [
            Entry(p + "self_attn.q_proj.bias", ("attn", "q_bias")),
            Entry(p + "self_attn.k_proj.bias", ("attn", "k_bias")),
            Entry(p + "self_attn.v_proj.bias", ("attn", "v_bias")),
        ]
    if gemma_norms:  # Gemma 2/3: norms after attention and MLP too
        layer += [
            Entry(p + "post_attention_layernorm.weight", ("post_attn_norm", "scale")),
            Entry(p + "pre_feedforward_layernorm.weight", ("pre_mlp_norm", "scale")),
            Entry(p + "post_feedforward_layernorm.weight", ("post_mlp_norm", "scale")),
        ]
    else:  # in Llama-style models `post_attention_layernorm` is the norm before the MLP
        layer.append(Entry(p + "post_attention_layernorm.weight", ("pre_mlp_norm", "scale")))
    if qk_norm:
        layer += [
            Entry(p + "self_attn.q_norm.weight", ("attn", "q_norm", "scale")),
            Entry(p + "self_attn.k_norm.weight", ("attn", "k_norm", "scale")),
        ]
    globals_ = (
        Entry("model.embed_tokens.weight", ("embedder", "embedding")),
        Entry("model.norm.weight", ("final_norm", "scale")),
        Entry("lm_head.weight", ("lm_head",), LINEAR_IN),  # absent when embeddings are tied
    )
    return Family(
        name, model_types, arch, globals_, tuple(layer), ignore_suffixes=("rotary_emb.inv_freq",)
    )


def _gpt2() -> Family:
    p = "transformer.h.{i}."
    layer = (
        Entry(p + "ln_1.weight", ("pre_attn_norm", "scale")),
        Entry(p + "ln_1.bias", ("pre_attn_norm", "bias")),
        Entry(p + "attn.c_attn.weight", ("attn", "q"), CONV1D, split=(0, 3)),
        Entry(p + "attn.c_attn.weight", ("attn", "k"), CONV1D, split=(1, 3)),
        Entry(p + "attn.c_attn.weight", ("attn", "v"), CONV1D, split=(2, 3)),
        Entry(p + "attn.c_attn.bias", ("attn", "q_bias"), FLAT, split=(0, 3)),
        Entry(p + "attn.c_attn.bias", ("attn", "k_bias"), FLAT, split=(1, 3)),
        Entry(p + "attn.c_attn.bias", ("attn", "v_bias"), FLAT, split=(2, 3)),
        Entry(p + "attn.c_proj.weight", ("attn", "o"), CONV1D_OUT_HEADS),
        Entry(p + "attn.c_proj.bias", ("attn", "o_bias")),
        Entry(p + "ln_2.weight", ("pre_mlp_norm", "scale")),
        Entry(p + "ln_2.bias", ("pre_mlp_norm", "bias")),
        Entry(p + "mlp.c_fc.weight", ("mlp", "up"), CONV1D),
        Entry(p + "mlp.c_fc.bias", ("mlp", "up_bias")),
        Entry(p + "mlp.c_proj.weight", ("mlp", "down"), CONV1D),
        Entry(p + "mlp.c_proj.bias", ("mlp", "down_bias")),
    )
    globals_ = (
        Entry("transformer.wte.weight", ("embedder", "embedding")),
        Entry("transformer.wpe.weight", ("embedder", "positions")),
        Entry("transformer.ln_f.weight", ("final_norm", "scale")),
        Entry("transformer.ln_f.bias", ("final_norm", "bias")),
        Entry("lm_head.weight", ("lm_head",), LINEAR_IN),
    )
    return Family(
        "gpt3",
        ("gpt2",),
        "GPT2LMHeadModel",
        globals_,
        layer,
        ignore_suffixes=("attn.bias", "attn.masked_bias"),
    )


FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama", ("llama",), "LlamaForCausalLM"),
    "mistral": _llama_like("mistral", ("mistral",), "MistralForCausalLM"),
    "qwen3": _llama_like("qwen3", ("qwen3",), "Qwen3ForCausalLM", qk_norm=True),
    "gemma": _llama_like("gemma", ("gemma",), "GemmaForCausalLM"),
    "gemma2": _llama_like("gemma2", ("gemma2",), "Gemma2ForCausalLM", gemma_norms=True),
    "gemma3": _llama_like(
        "gemma3", ("gemma3_text",), "Gemma3ForCausalLM", qk_norm=True, gemma_norms=True
    ),
    "gpt3": _gpt2(),
}


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConversionError(
        f"Unsupported model_type '{model_type}'. Supported: {', '.join(supported)}."
    )
