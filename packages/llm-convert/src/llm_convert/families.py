"""One declarative mapping table per family: Hugging Face tensor name -> native parameter path.

Layer entries use `{i}` for the layer index. Native paths are relative to a decoder layer; the generic
loader places layer i where `llm_core.layer_placement` puts it (a stacked segment at some index, or an
unstacked one). An entry with `ffn` set applies only to layers of that feed-forward kind (`dense` or
`moe`). Per-expert entries use `{j}` for the expert index: the loader writes tensor j at index j of the
native expert axis. Fused tensors (GPT-2's qkv `c_attn`, transformers' `gate_up_proj`) are split by
`split` entries. A family can accept several tensor layouts (`layouts`); an entry with `layout` set
belongs to that one only. The loader uses the layout the checkpoint has; export writes `layouts[0]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_convert.errors import ConversionError
from llm_convert.transforms import (
    CONV1D,
    CONV1D_OUT_HEADS,
    EXPERTS_LINEAR,
    FLAT,
    IDENTITY,
    LINEAR_IN,
    LINEAR_OUT_HEADS,
    Transform,
)

STANDARD = "standard"
PER_EXPERT = "per_expert"  # one tensor per expert (Hub checkpoints; transformers' save_pretrained)
FUSED = "fused"  # transformers' in-memory layout: experts stacked, gate and up fused


@dataclass(frozen=True)
class Entry:
    hf: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    native: tuple[str, ...]  # e.g. ("attn", "q", "kernel") inside a layer, or a global path
    transform: Transform = IDENTITY
    split: tuple[int, int] | None = None  # (part, parts): slice `part` of `parts` along split_axis
    split_axis: int = -1  # of the HF tensor
    # the parts alternate along the last axis (GPT-OSS gate_up) instead of following each other
    interleaved: bool = False
    ffn: str | None = None  # only layers of this feed-forward kind ("dense" or "moe")
    layout: str | None = None  # only this tensor layout of the family
    # only models with this attention feature (`attention_features` in layout.py): "q_plain",
    # "q_lora", "bias", "q_lora_bias"
    attn: str | None = None

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architecture: str
    globals: tuple[Entry, ...]
    layer: tuple[Entry, ...]
    ignore_suffixes: tuple[str, ...] = ()
    layouts: tuple[str, ...] = (STANDARD,)
    # DeepSeek-V3 checkpoints store the multi-token-prediction modules as layers past num_layers:
    # the decoder-layer entries plus `mtp` (relative to the module) and `mtp_copies` (copies of
    # global tensors: read into, and written from, the global parameter)
    mtp_layers_after_decoder: bool = False
    mtp: tuple[Entry, ...] = ()
    mtp_copies: tuple[Entry, ...] = ()


LLAMA_GLOBALS = (
    Entry("model.embed_tokens.weight", ("embedder", "embedding")),
    Entry("model.norm.weight", ("final_norm", "scale")),
    Entry("lm_head.weight", ("lm_head", "kernel"), LINEAR_IN),  # absent when tied
)


def _norms_and_attention(p: str) -> list[Entry]:
    """A Llama-style layer's two norms and its q, k, v, o projections."""
    a = p + "self_attn."
    return [
        Entry(p + "input_layernorm.weight", ("pre_attn_norm", "scale")),
        Entry(p + "post_attention_layernorm.weight", ("pre_mlp_norm", "scale")),
        Entry(a + "q_proj.weight", ("attn", "q", "kernel"), LINEAR_IN),
        Entry(a + "k_proj.weight", ("attn", "k", "kernel"), LINEAR_IN),
        Entry(a + "v_proj.weight", ("attn", "v", "kernel"), LINEAR_IN),
        Entry(a + "o_proj.weight", ("attn", "o", "kernel"), LINEAR_OUT_HEADS),
    ]


def _per_expert(p: str, router: str, gate: str, up: str, down: str) -> list[Entry]:
    """Hub layout: a router [experts, embed] and one [out, in] Linear weight per expert."""
    e = p + "experts.{j}."
    return [
        Entry(p + router, ("mlp", "router", "kernel"), LINEAR_IN, ffn="moe", layout=PER_EXPERT),
        Entry(e + gate, ("mlp", "gate", "kernel"), LINEAR_IN, ffn="moe", layout=PER_EXPERT),
        Entry(e + up, ("mlp", "up", "kernel"), LINEAR_IN, ffn="moe", layout=PER_EXPERT),
        Entry(e + down, ("mlp", "down", "kernel"), LINEAR_IN, ffn="moe", layout=PER_EXPERT),
    ]


def _fused(p: str) -> list[Entry]:
    """transformers 5 layout: gate_up_proj [experts, 2 * moe_mlp, embed] (gate rows first) and
    down_proj [experts, embed, moe_mlp]."""
    kw = dict(ffn="moe", layout=FUSED)
    gate_up = p + "mlp.experts.gate_up_proj"
    return [
        Entry(p + "mlp.gate.weight", ("mlp", "router", "kernel"), LINEAR_IN, **kw),
        Entry(
            gate_up, ("mlp", "gate", "kernel"), EXPERTS_LINEAR, split=(0, 2), split_axis=-2, **kw
        ),
        Entry(gate_up, ("mlp", "up", "kernel"), EXPERTS_LINEAR, split=(1, 2), split_axis=-2, **kw),
        Entry(p + "mlp.experts.down_proj", ("mlp", "down", "kernel"), EXPERTS_LINEAR, **kw),
    ]


def _llama_like(
    name, model_types, arch, qk_norm=False, gemma_norms=False, bias=False, experts=None
) -> Family:
    """experts: None (dense only), or "mixtral" / "qwen3_moe" for that family's MoE tensor names."""
    p = "model.layers.{i}."
    layer = [
        Entry(p + "self_attn.q_proj.weight", ("attn", "q", "kernel"), LINEAR_IN),
        Entry(p + "self_attn.k_proj.weight", ("attn", "k", "kernel"), LINEAR_IN),
        Entry(p + "self_attn.v_proj.weight", ("attn", "v", "kernel"), LINEAR_IN),
        Entry(p + "self_attn.o_proj.weight", ("attn", "o", "kernel"), LINEAR_OUT_HEADS),
        Entry(p + "mlp.gate_proj.weight", ("mlp", "gate", "kernel"), LINEAR_IN, ffn="dense"),
        Entry(p + "mlp.up_proj.weight", ("mlp", "up", "kernel"), LINEAR_IN, ffn="dense"),
        Entry(p + "mlp.down_proj.weight", ("mlp", "down", "kernel"), LINEAR_IN, ffn="dense"),
        Entry(p + "input_layernorm.weight", ("pre_attn_norm", "scale")),
    ]
    if experts == "mixtral":
        layer += _per_expert(
            p + "block_sparse_moe.", "gate.weight", "w1.weight", "w3.weight", "w2.weight"
        )
    elif experts == "qwen3_moe":
        layer += _per_expert(
            p + "mlp.", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
        )
    if experts:
        layer += _fused(p)
    if bias:
        layer += [
            Entry(p + "self_attn.q_proj.bias", ("attn", "q", "bias"), FLAT),
            Entry(p + "self_attn.k_proj.bias", ("attn", "k", "bias"), FLAT),
            Entry(p + "self_attn.v_proj.bias", ("attn", "v", "bias"), FLAT),
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
    return Family(
        name,
        model_types,
        arch,
        LLAMA_GLOBALS,
        tuple(layer),
        ignore_suffixes=("rotary_emb.inv_freq",),
        layouts=(PER_EXPERT, FUSED) if experts else (STANDARD,),
    )


def _deepseek(name: str, model_type: str, arch: str, v3: bool) -> Family:
    """DeepSeek-V2/V3: MLA attention (q_proj, or q_a -> norm -> q_b when q_lora_rank is set; the
    absent one is simply not in the checkpoint), dense first layers, routed + shared experts and,
    for V3, the router's expert-choice bias."""
    p, a = "model.layers.{i}.", "model.layers.{i}.self_attn."
    layer = [
        Entry(p + "input_layernorm.weight", ("pre_attn_norm", "scale")),
        Entry(p + "post_attention_layernorm.weight", ("pre_mlp_norm", "scale")),
        Entry(a + "kv_a_proj_with_mqa.weight", ("attn", "kv_a", "kernel"), LINEAR_IN),
        Entry(a + "kv_a_layernorm.weight", ("attn", "kv_a_norm", "scale")),
        Entry(a + "kv_b_proj.weight", ("attn", "kv_b", "kernel"), LINEAR_IN),
        Entry(a + "o_proj.weight", ("attn", "o", "kernel"), LINEAR_OUT_HEADS),
        Entry(p + "mlp.gate_proj.weight", ("mlp", "gate", "kernel"), LINEAR_IN, ffn="dense"),
        Entry(p + "mlp.up_proj.weight", ("mlp", "up", "kernel"), LINEAR_IN, ffn="dense"),
        Entry(p + "mlp.down_proj.weight", ("mlp", "down", "kernel"), LINEAR_IN, ffn="dense"),
    ]
    layer += [Entry(a + "q_proj.weight", ("attn", "q", "kernel"), LINEAR_IN, attn="q_plain")]
    layer += [
        Entry(a + "q_a_proj.weight", ("attn", "q_a", "kernel"), LINEAR_IN, attn="q_lora"),
        Entry(a + "q_a_layernorm.weight", ("attn", "q_a_norm", "scale"), attn="q_lora"),
        Entry(a + "q_b_proj.weight", ("attn", "q_b", "kernel"), LINEAR_IN, attn="q_lora"),
    ]
    layer += [  # attention_bias: on the projections out of the hidden state and on o
        Entry(a + "q_a_proj.bias", ("attn", "q_a", "bias"), attn="q_lora_bias"),
        Entry(a + "kv_a_proj_with_mqa.bias", ("attn", "kv_a", "bias"), attn="bias"),
        Entry(a + "o_proj.bias", ("attn", "o", "bias"), attn="bias"),
    ]
    for part in ("gate", "up", "down"):
        layer.append(
            Entry(
                p + f"mlp.shared_experts.{part}_proj.weight",
                ("mlp", "shared", part, "kernel"),
                LINEAR_IN,
                ffn="moe",
            )
        )
    if v3:
        layer.append(
            Entry(p + "mlp.gate.e_score_correction_bias", ("mlp", "router_bias"), ffn="moe")
        )
    layer += _per_expert(
        p + "mlp.", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
    )
    layer += _fused(p)
    return Family(
        name,
        (model_type,),
        arch,
        LLAMA_GLOBALS,
        tuple(layer),
        ignore_suffixes=("rotary_emb.inv_freq",),
        layouts=(PER_EXPERT, FUSED),
        mtp_layers_after_decoder=v3,
        mtp=(
            Entry(p + "enorm.weight", ("enorm", "scale")),
            Entry(p + "hnorm.weight", ("hnorm", "scale")),
            Entry(p + "eh_proj.weight", ("eh_proj", "kernel"), LINEAR_IN),
            Entry(p + "shared_head.norm.weight", ("norm", "scale")),
        ),
        mtp_copies=(
            Entry(p + "embed_tokens.weight", ("embedder", "embedding")),
            Entry(p + "shared_head.head.weight", ("lm_head", "kernel"), LINEAR_IN),
        ),
    )


def _gpt_oss() -> Family:
    """GPT-OSS: Llama-style attention with biases and sinks; every layer MoE with a biased router
    and experts stored stacked as [experts, in, out] with gate and up interleaved in gate_up_proj."""
    p, a, x = "model.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp.experts."
    layer = [
        *_norms_and_attention(p),
        Entry(a + "q_proj.bias", ("attn", "q", "bias"), FLAT),
        Entry(a + "k_proj.bias", ("attn", "k", "bias"), FLAT),
        Entry(a + "v_proj.bias", ("attn", "v", "bias"), FLAT),
        Entry(a + "o_proj.bias", ("attn", "o", "bias")),
        Entry(a + "sinks", ("attn", "sinks")),
        Entry(p + "mlp.router.weight", ("mlp", "router", "kernel"), LINEAR_IN),
        Entry(p + "mlp.router.bias", ("mlp", "router", "bias")),
        Entry(x + "down_proj", ("mlp", "down", "kernel")),
        Entry(x + "down_proj_bias", ("mlp", "down", "bias")),
    ]
    for part, name in enumerate(("gate", "up")):
        kw = dict(split=(part, 2), split_axis=-1, interleaved=True)
        layer += [
            Entry(x + "gate_up_proj", ("mlp", name, "kernel"), **kw),
            Entry(x + "gate_up_proj_bias", ("mlp", name, "bias"), **kw),
        ]
    return Family(
        "gpt_oss", ("gpt_oss",), "GptOssForCausalLM", LLAMA_GLOBALS, tuple(layer),
        ignore_suffixes=("rotary_emb.inv_freq",),
    )  # fmt: skip


def _llama4() -> Family:
    """Llama 4 text: Llama attention; dense layers `feed_forward.*_proj`; MoE layers a router,
    stacked experts ([experts, in, out], gate_up_proj with the gate half first) and a shared
    expert."""
    p, f = "model.layers.{i}.", "model.layers.{i}.feed_forward."
    layer = [
        *_norms_and_attention(p),
        Entry(f + "router.weight", ("mlp", "router", "kernel"), LINEAR_IN, ffn="moe"),
        Entry(f + "experts.gate_up_proj", ("mlp", "gate", "kernel"), split=(0, 2), ffn="moe"),
        Entry(f + "experts.gate_up_proj", ("mlp", "up", "kernel"), split=(1, 2), ffn="moe"),
        Entry(f + "experts.down_proj", ("mlp", "down", "kernel"), ffn="moe"),
    ]
    for part in ("gate", "up", "down"):
        layer += [
            Entry(f + f"{part}_proj.weight", ("mlp", part, "kernel"), LINEAR_IN, ffn="dense"),
            Entry(
                f + f"shared_expert.{part}_proj.weight",
                ("mlp", "shared", part, "kernel"),
                LINEAR_IN,
                ffn="moe",
            ),
        ]
    return Family(
        "llama4", ("llama4_text",), "Llama4ForCausalLM", LLAMA_GLOBALS, tuple(layer),
        ignore_suffixes=("rotary_emb.inv_freq",),
    )  # fmt: skip


def _gpt2() -> Family:
    p = "transformer.h.{i}."
    layer = (
        Entry(p + "ln_1.weight", ("pre_attn_norm", "scale")),
        Entry(p + "ln_1.bias", ("pre_attn_norm", "bias")),
        Entry(p + "attn.c_attn.weight", ("attn", "q", "kernel"), CONV1D, split=(0, 3)),
        Entry(p + "attn.c_attn.weight", ("attn", "k", "kernel"), CONV1D, split=(1, 3)),
        Entry(p + "attn.c_attn.weight", ("attn", "v", "kernel"), CONV1D, split=(2, 3)),
        Entry(p + "attn.c_attn.bias", ("attn", "q", "bias"), FLAT, split=(0, 3)),
        Entry(p + "attn.c_attn.bias", ("attn", "k", "bias"), FLAT, split=(1, 3)),
        Entry(p + "attn.c_attn.bias", ("attn", "v", "bias"), FLAT, split=(2, 3)),
        Entry(p + "attn.c_proj.weight", ("attn", "o", "kernel"), CONV1D_OUT_HEADS),
        Entry(p + "attn.c_proj.bias", ("attn", "o", "bias")),
        Entry(p + "ln_2.weight", ("pre_mlp_norm", "scale")),
        Entry(p + "ln_2.bias", ("pre_mlp_norm", "bias")),
        Entry(p + "mlp.c_fc.weight", ("mlp", "up", "kernel"), CONV1D),
        Entry(p + "mlp.c_fc.bias", ("mlp", "up", "bias")),
        Entry(p + "mlp.c_proj.weight", ("mlp", "down", "kernel"), CONV1D),
        Entry(p + "mlp.c_proj.bias", ("mlp", "down", "bias")),
    )
    globals_ = (
        Entry("transformer.wte.weight", ("embedder", "embedding")),
        Entry("transformer.wpe.weight", ("embedder", "positions")),
        Entry("transformer.ln_f.weight", ("final_norm", "scale")),
        Entry("transformer.ln_f.bias", ("final_norm", "bias")),
        Entry("lm_head.weight", ("lm_head", "kernel"), LINEAR_IN),
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
    "mixtral": _llama_like("mixtral", ("mixtral",), "MixtralForCausalLM", experts="mixtral"),
    "qwen3": _llama_like("qwen3", ("qwen3",), "Qwen3ForCausalLM", qk_norm=True),
    "qwen3_moe": _llama_like(
        "qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", qk_norm=True, experts="qwen3_moe"
    ),
    "gemma": _llama_like("gemma", ("gemma",), "GemmaForCausalLM"),
    "gemma2": _llama_like("gemma2", ("gemma2",), "Gemma2ForCausalLM", gemma_norms=True),
    "gemma3": _llama_like(
        "gemma3", ("gemma3_text",), "Gemma3ForCausalLM", qk_norm=True, gemma_norms=True
    ),
    "gpt3": _gpt2(),
    "deepseek_v2": _deepseek("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", v3=False),
    "deepseek_v3": _deepseek("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", v3=True),
    "gpt_oss": _gpt_oss(),
    "llama4": _llama4(),
}


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConversionError(
        f"Unsupported model_type '{model_type}'. Supported: {', '.join(supported)}."
    )
