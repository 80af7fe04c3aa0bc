"""LoRA adapters exported as a PEFT folder: peft on the transformers base model computes what the
llm-core LoRA model computes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_hf import build_hf_model, torch, transformers

from llm_convert import ConversionError, read_hf, save_peft_adapter
from llm_core import LoRALinear, build_model, lift_into_lora

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_peft_adapter_reproduces_our_lora_model(name, tmp_path):
    hf_dir = tmp_path / "hf"
    build_hf_model(name, hf_dir)
    cfg, params = read_hf(hf_dir)
    lora = build_model(cfg.replace(lora_rank=4, lora_alpha=8.0), rngs=nnx.Rngs(0))
    state = nnx.state(lora, nnx.Param)
    nnx.replace_by_pure_dict(state, lift_into_lora(params, nnx.to_pure_dict(state)))
    nnx.update(lora, state)
    key = jax.random.key(1)
    for _, node in nnx.iter_graph(lora):
        if isinstance(node, LoRALinear):
            key, sub = jax.random.split(key)
            node.lora_b[...] = 0.1 * jax.random.normal(sub, node.lora_b.shape)

    adapter = save_peft_adapter(lora, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids).long()).logits.numpy()
        with model.disable_adapter():
            plain = model(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(lora(ids))
    assert np.abs(ours - plain).max() > 1e-3  # the adapters change the output
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_a_model_without_adapters_is_refused(tmp_path):
    hf_dir = tmp_path / "hf"
    build_hf_model("llama2", hf_dir)
    cfg, _ = read_hf(hf_dir)
    with pytest.raises(ConversionError, match="no LoRA adapters"):
        save_peft_adapter(build_model(cfg, rngs=nnx.Rngs(0)), tmp_path / "adapter")


def test_expert_adapters_are_refused_not_dropped(tmp_path):
    hf_dir = tmp_path / "hf"
    build_hf_model("mixtral", hf_dir)
    cfg, _ = read_hf(hf_dir)
    lora = build_model(cfg.replace(lora_rank=2, lora_experts=True), rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"MoE experts .*mlp/down.* export the merged model"):
        save_peft_adapter(lora, tmp_path / "adapter")
