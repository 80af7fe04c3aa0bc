"""Each shipped DeepSeek / GPT-OSS / Llama 4 config has exactly the parameters of transformers'
model built (on the meta device: nothing allocated) from the config.json that llm-convert writes for
it, and reading that config.json back gives the shipped config's architecture."""

from __future__ import annotations

import pytest
from tiny_hf import torch, transformers

from llm_convert.hf_config import config_from_hf, config_to_hf
from llm_core import count_params, load_config

pytestmark = pytest.mark.convert
CONFIG_CLASSES = {
    "deepseek_v2": "DeepseekV2Config",
    "deepseek_v3": "DeepseekV3Config",
    "gpt_oss": "GptOssConfig",
    "llama4_text": "Llama4TextConfig",
}
NAMES = [
    "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "gpt-oss-20b", "gpt-oss-120b",
    "llama4-scout-17b-16e", "llama4-maverick-17b-128e",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_counts_equal_transformers(name):
    ours = load_config(name)
    hf_dict = config_to_hf(ours, "bfloat16")
    hf_config = getattr(transformers, CONFIG_CLASSES[hf_dict["model_type"]])(**{
        k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type", "dtype")
    })  # fmt: skip
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    theirs = sum(p.numel() for p in hf.parameters())
    # transformers keeps DeepSeek-V3's router bias as a buffer, not a parameter
    theirs += sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert count_params(ours) == theirs
    read, _ = config_from_hf(hf_config.to_dict())
    keys = ("num_layers", "num_experts", "moe_mlp_dim", "mlp_dim", "num_shared_experts",
            "first_num_dense_layers", "moe_num_groups", "router_kind", "attention_kind",
            "q_lora_rank", "kv_lora_rank", "attention_pattern", "nope_layer_interval")  # fmt: skip
    for key in keys:
        assert getattr(read, key) == getattr(ours, key), key
