"""Greedy parity with Hugging Face `transformers` generate on a tiny random Llama and Mixtral (MoE).

The Llama weights reach llm-core two ways: mapped by hand here (HF Linear [out, in] -> our kernel
[in, ...]), which needs no llm-convert, and through `llm_convert.load_hf` from a saved HF folder (the
CLI's path). The Mixtral weights take the llm-convert path.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from llm_core import build_model, load_config
from llm_serve.engine import Engine
from llm_serve.sampling import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.convert

V, E, M, L, H, K, D = 320, 64, 128, 2, 4, 2, 16
NEW_TOKENS = 16
PROMPTS = [[1, 5, 9, 200, 17], list(range(30, 70)), [3]]


def hf_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=M,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        head_dim=D,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def to_native(hf) -> tuple:
    cfg = load_config(
        "bench-small.yml",
        [
            f"vocab_size={V}", f"emb_dim={E}", f"mlp_dim={M}", f"num_layers={L}",
            f"num_heads={H}", f"num_kv_heads={K}", f"head_dim={D}", "norm_eps=1e-5",
            "kv_cache_max_length=128", "max_prefill_length=32", "max_decode_slots=4",
        ],
    )  # fmt: skip
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    layer = lambda name: np.stack([sd[f"model.layers.{i}.{name}"] for i in range(L)])  # noqa: E731
    kernel = lambda name, *shape: {  # noqa: E731  HF Linear [out, in] -> our kernel [in, ...]
        "kernel": layer(f"{name}.weight").transpose(0, 2, 1).reshape(L, *shape)
    }
    pure = {
        "embedder": {"embedding": sd["model.embed_tokens.weight"]},
        "final_norm": {"scale": sd["model.norm.weight"]},
        "lm_head": {"kernel": sd["lm_head.weight"].T},
        "groups": {
            "layer_0": {
                "attn": {
                    "q": kernel("self_attn.q_proj", E, H, D),
                    "k": kernel("self_attn.k_proj", E, K, D),
                    "v": kernel("self_attn.v_proj", E, K, D),
                    "o": kernel("self_attn.o_proj", H, D, E),
                },
                "mlp": {
                    "gate": kernel("mlp.gate_proj", E, M),
                    "up": kernel("mlp.up_proj", E, M),
                    "down": kernel("mlp.down_proj", M, E),
                },
                "pre_attn_norm": {"scale": layer("input_layernorm.weight")},
                "pre_mlp_norm": {"scale": layer("post_attention_layernorm.weight")},
            }
        },
    }
    model = build_model(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return cfg, model


def hf_greedy(hf, prompt):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def via_llm_convert(hf, folder):
    llm_convert = pytest.importorskip("llm_convert")
    hf.save_pretrained(folder)
    model = llm_convert.load_hf(
        folder, overrides=["kv_cache_max_length=128", "max_prefill_length=32", "max_decode_slots=4"]
    )
    return model.cfg, model


def engine_greedy(cfg, model, kind: str) -> list[list[int]]:
    """NEW_TOKENS greedy tokens for every prompt, all decoded together in one batch."""
    engine, params = Engine.from_model(cfg, model, kv_cache_kind=kind)
    state = engine.init_decode_state()
    got = []
    for slot, prompt in enumerate(PROMPTS):
        prefix = engine.prefill(params, prompt, SamplingParams(temperature=0.0))
        state = engine.insert(prefix, state, slot)
        got.append([int(prefix.first.tokens[0])])
    for _ in range(NEW_TOKENS - 1):
        state, out = engine.generate(params, state)
        for slot, tokens in enumerate(got):
            tokens.append(int(out.tokens[slot]))
    return got


@pytest.mark.parametrize(
    "kind,loader",
    [("contiguous", "by-hand"), ("paged", "by-hand"), ("contiguous", "llm-convert")],
)
def test_greedy_matches_transformers_generate(kind, loader, tmp_path):
    hf = hf_model()
    cfg, model = to_native(hf) if loader == "by-hand" else via_llm_convert(hf, tmp_path / "hf")
    got = engine_greedy(cfg, model, kind)
    for slot, prompt in enumerate(PROMPTS):
        assert got[slot] == hf_greedy(hf, prompt), f"prompt {slot}"


def hf_mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=32,  # one expert's hidden width
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        head_dim=D,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        sliding_window=None,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_moe_greedy_matches_transformers_generate(kind, tmp_path):
    hf = hf_mixtral()
    cfg, model = via_llm_convert(hf, tmp_path / "hf")
    assert cfg.ffn_kind == "moe" and cfg.num_experts == 4
    got = engine_greedy(cfg, model, kind)
    for slot, prompt in enumerate(PROMPTS):
        assert got[slot] == hf_greedy(hf, prompt), f"prompt {slot}"


def hf_deepseek(version: str):
    """Tiny DeepSeek-V2-Lite-like (plain query projection, greedy softmax routing) or DeepSeek-V3
    (query bottleneck, sigmoid + bias + groups, YaRN) with MLA and shared experts."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=V, hidden_size=E, intermediate_size=M, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=H, num_key_value_heads=H, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    if version == "v2-lite":
        config = transformers.DeepseekV2Config(**common, q_lora_rank=None, n_shared_experts=2)
        model = transformers.DeepseekV2ForCausalLM(config).eval()
        # its EOS id (2) is a greedy choice here: min_new_tokens would forbid it in generate, while
        # the engine (no stop tokens) takes it like any other token
        model.generation_config.eos_token_id = None
        return model
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 64}  # fmt: skip
    config = transformers.DeepseekV3Config(
        **common, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
        rope_parameters=yarn,
    )  # fmt: skip
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


@pytest.mark.parametrize("version", ["v2-lite", "v3"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_deepseek_greedy_matches_transformers_generate(version, kind, tmp_path):
    """MLA decodes from the latent cache (absorbed form), contiguous and paged."""
    hf = hf_deepseek(version)
    cfg, model = via_llm_convert(hf, tmp_path / "hf")
    assert cfg.attention_kind == "mla" and cfg.num_shared_experts > 0
    got = engine_greedy(cfg, model, kind)
    for slot, prompt in enumerate(PROMPTS):
        assert got[slot] == hf_greedy(hf, prompt), f"prompt {slot}"


def hf_gpt_oss():
    """Tiny GPT-OSS: sinks, a window (8) shorter than the prompts on alternate layers, biased
    router and experts, clamped SwiGLU."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=V, hidden_size=E, intermediate_size=32, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=K, head_dim=D, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
        initializer_range=0.2, swiglu_limit=2.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "truncate": False, "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "sinks")):
                p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_gpt_oss_greedy_matches_transformers_generate(kind, tmp_path):
    hf = hf_gpt_oss()
    cfg, model = via_llm_convert(hf, tmp_path / "hf")
    assert cfg.attention_sinks and cfg.attention_pattern == ["local", "global"]
    got = engine_greedy(cfg, model, kind)
    for slot, prompt in enumerate(PROMPTS):
        assert got[slot] == hf_greedy(hf, prompt), f"prompt {slot}"


def hf_llama4():
    """Tiny Llama 4 text: a NoPE layer with temperature tuning, chunked attention (8) shorter than
    the prompts on RoPE layers, MoE every 2nd layer with top-1 input scaling and a shared expert."""
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=V, hidden_size=E, intermediate_size=32, intermediate_size_mlp=M,
        num_hidden_layers=4, num_attention_heads=H, num_key_value_heads=K, head_dim=D,
        num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Llama4ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # the engine has no stop tokens here
    return model


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_llama4_greedy_matches_transformers_generate(kind, tmp_path):
    hf = hf_llama4()
    cfg, model = via_llm_convert(hf, tmp_path / "hf")
    assert cfg.nope_layer_interval == 4 and cfg.attention_local_chunk == 8
    got = engine_greedy(cfg, model, kind)
    for slot, prompt in enumerate(PROMPTS):
        assert got[slot] == hf_greedy(hf, prompt), f"prompt {slot}"
