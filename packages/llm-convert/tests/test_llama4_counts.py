"""The shipped Llama 4 text configs have exactly the parameters of transformers' Llama4ForCausalLM
built (on the meta device: nothing allocated) from the published text configs."""

from __future__ import annotations

import pytest
from tiny_hf import torch, transformers

from llm_convert.hf_config import config_from_hf
from llm_core import count_params, load_config

pytestmark = pytest.mark.convert

SCOUT = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
    max_position_embeddings=10485760, attention_chunk_size=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192},
)  # fmt: skip
MAVERICK = dict(
    SCOUT, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
    max_position_embeddings=1048576,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "published"),
    [("llama4-scout-17b-16e", SCOUT), ("llama4-maverick-17b-128e", MAVERICK)],
)
def test_llama4_counts_equal_transformers(name, published):
    hf_config = transformers.Llama4TextConfig(**published)
    with torch.device("meta"):
        hf = transformers.Llama4ForCausalLM(hf_config)
    theirs = sum(p.numel() for p in hf.parameters())
    ours = load_config(name)
    assert count_params(ours) == theirs
    # and the shipped config is what llm-convert reads from that config.json
    read, _ = config_from_hf(hf_config.to_dict())
    for key in ("num_experts", "moe_layer_interval", "nope_layer_interval", "attention_local_chunk",
                "qk_l2_norm", "mlp_dim", "moe_mlp_dim", "rope_kind", "rope_scaling_factor"):  # fmt: skip
        assert getattr(read, key) == getattr(ours, key), key
