"""Mixtral / Qwen3-MoE: both expert tensor layouts import; export loads in transformers."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from tiny_hf import build_hf_model, torch, transformers

from llm_convert import ConversionError, load_hf, read_hf, save_hf
from llm_core import build_model, load_config

pytestmark = pytest.mark.convert
MOE = ["mixtral", "qwen3_moe-mixed"]


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def _fused_folder(hf_model, hub_dir, dst):
    """transformers' in-memory (fused) layout: its own state_dict, written as it is."""
    dst.mkdir()
    shutil.copy(hub_dir / "config.json", dst / "config.json")
    state = {k: v.detach().contiguous().numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # really the fused layout
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", MOE)
def test_fused_and_per_expert_layouts_load_the_same(name, tmp_path):
    hub_dir = tmp_path / "hub"
    hf_model = build_hf_model(name, hub_dir)  # save_pretrained writes the per-expert layout
    fused = _fused_folder(hf_model, hub_dir, tmp_path / "fused")
    _, from_hub = read_hf(hub_dir)
    _, from_fused = read_hf(fused)
    jax.tree.map(np.testing.assert_array_equal, from_hub, from_fused)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 16)).astype(np.int32)
    ours = np.asarray(load_hf(fused)(ids))
    np.testing.assert_allclose(ours, _logits(hf_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MOE)
def test_export_loads_in_transformers(name, tmp_path):
    hf_model = build_hf_model(name, tmp_path / "hf")
    back = save_hf(load_hf(tmp_path / "hf"), tmp_path / "back")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back)).eval()
    for key in ("num_local_experts", "num_experts_per_tok", "intermediate_size"):
        assert getattr(reloaded.config, key) == getattr(hf_model.config, key), key
    if name.startswith("qwen3_moe"):
        keys = ("moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob")
        for key in keys:
            assert getattr(reloaded.config, key) == getattr(hf_model.config, key), key
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 16)).astype(np.int32)
    np.testing.assert_allclose(_logits(reloaded, ids), _logits(hf_model, ids), atol=1e-5, rtol=0)


TINY = dict(
    vocab_size=64, emb_dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, seq_len=16
)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (dict(model_family="mixtral", moe_layer_interval=2), "moe_layer_interval must be 1"),
        (dict(model_family="llama"), "has no experts"),
    ],
)
def test_export_refuses_what_the_hf_family_cannot_express(overrides, fragment, tmp_path):
    cfg = load_config(None, {**TINY, "ffn_kind": "moe", "num_experts": 4, **overrides})
    with pytest.raises(ConversionError, match=fragment):
        save_hf(build_model(cfg, rngs=nnx.Rngs(0)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_qwen3_moe_first_dense_layers_export_as_mlp_only_layers(tmp_path):
    cfg = load_config(
        None,
        {
            **TINY,
            "num_layers": 3,
            "model_family": "qwen3_moe",
            "qk_norm": True,
            "ffn_kind": "moe",
            "num_experts": 4,
            "moe_mlp_dim": 16,
            "first_num_dense_layers": 1,
            "mlp_only_layers": [2],
        },
    )
    out = save_hf(build_model(cfg, rngs=nnx.Rngs(0)), tmp_path / "out")
    hf = json.loads((out / "config.json").read_text())
    assert hf["mlp_only_layers"] == [0, 2] and hf["moe_intermediate_size"] == 16
    reloaded_cfg, _ = read_hf(out)
    assert reloaded_cfg.mlp_only_layers == [0, 2] and reloaded_cfg.ffn_kind == "moe"
