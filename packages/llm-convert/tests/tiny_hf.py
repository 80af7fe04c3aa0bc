"""Tiny random Hugging Face models, built locally from transformers' own config classes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


# 4 layers of 4 stacked experts 32 wide (GPT-OSS, Llama 4: intermediate_size is the expert width)
SMALL_EXPERTS = dict(COMMON, intermediate_size=32, num_hidden_layers=4, num_local_experts=4)
MLA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=24,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=256,
)
DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


LLAMA4_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# NoPE layer 3, chunked attention (8) on RoPE layers, MoE every 2nd layer, dense layers 96 wide
LLAMA4 = dict(
    SMALL_EXPERTS,
    intermediate_size_mlp=96,
    interleave_moe_layer_step=2,
    attention_chunk_size=8,
    rope_parameters=LLAMA4_ROPE,
)
GPT_OSS_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 64,
}


def tiny_hf_configs() -> dict:
    t = transformers
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return {
        "llama3": t.LlamaConfig(**COMMON, num_hidden_layers=3, rope_parameters=llama3_rope),
        "llama2": t.LlamaConfig(
            **{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=2, rms_norm_eps=1e-5
        ),
        "llama-yarn": t.LlamaConfig(
            **COMMON,
            num_hidden_layers=2,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral": t.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=8),
        "qwen3": t.Qwen3Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=False),
        "gemma": t.GemmaConfig(**{**COMMON, "num_key_value_heads": 1}, num_hidden_layers=2),
        "gemma2": t.Gemma2Config(
            **COMMON, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24
        ),
        "gemma3": t.Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=7,
            sliding_window=8,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "mixtral": t.MixtralConfig(
            **COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2
        ),
        "qwen3_moe": t.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
        ),
        # layers D D D M D D D M D: dense layers use intermediate_size, MoE layers
        # moe_intermediate_size; placed as 2 stacked groups of (D D D M) plus a dense tail
        "qwen3_moe-mixed": t.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=9,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=2,
            mlp_only_layers=[1, 5],
        ),
        # MLA with a plain query projection, greedy softmax routing, 2 shared experts
        "deepseek_v2-lite": t.DeepseekV2Config(
            **MLA,
            num_hidden_layers=3,
            q_lora_rank=None,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            first_k_dense_replace=1,
            rope_parameters=DEEPSEEK_YARN,
        ),
        # group-limited greedy (group max), scaled weights
        "deepseek_v2": t.DeepseekV2Config(
            **MLA,
            num_hidden_layers=3,
            q_lora_rank=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
        ),
        # sigmoid + bias + groups (top-2 sum), dense first layers, shared expert, YaRN mscale
        "deepseek_v3": t.DeepseekV3Config(
            **MLA,
            num_key_value_heads=4,  # transformers' default (128) breaks its eager attention
            num_hidden_layers=4,
            q_lora_rank=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=2,
            n_group=4,
            topk_group=2,
            rope_parameters={**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        ),
        # sinks, alternating window (8) / full layers, biased router and experts, clamped SwiGLU
        # (a low limit, so the clamps bite), YaRN without truncation
        "gpt_oss": t.GptOssConfig(
            **SMALL_EXPERTS,
            num_experts_per_tok=2,
            sliding_window=8,
            swiglu_limit=0.1,
            rope_parameters=GPT_OSS_YARN,
        ),
        # NoPE layer 3 (with temperature tuning: floor_scale 4 so it bites), chunked attention (8)
        # on RoPE layers with the weightless QK norm, MoE every 2nd layer (top-1 sigmoid scaling
        # the expert input, shared expert), dense layers of another width
        "llama4": t.Llama4TextConfig(**LLAMA4, floor_scale=4),
        # Llama 4 routing with k = 2 (the released models use 1): each expert's input is scaled
        "llama4_top2": t.Llama4TextConfig(**LLAMA4, num_experts_per_tok=2),
        "gpt2": t.GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
    }


def build_hf_model(name: str, folder, dtype=None):
    """Instantiate from the config class with random weights, save_pretrained to `folder`."""
    cfg = tiny_hf_configs()[name]
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # norms start at identity; perturb so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):  # norms, biases, sinks; GPT-OSS expert biases
                p.add_(0.1 * torch.randn_like(p))
        for name, buffer in model.named_buffers():  # DeepSeek-V3's router bias starts at zero
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    model.eval()
    model.save_pretrained(folder)
    return model
