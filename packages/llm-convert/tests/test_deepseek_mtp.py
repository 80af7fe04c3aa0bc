"""DeepSeek-V3's multi-token-prediction module survives conversion: a Hub-style folder (the module
stored as the layer after the decoder, with copies of the embedding and head) -> native (the
`mtp_0` module filled) -> HF again with identical tensors, which transformers still loads (it
ignores the module) with the original logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_hf import build_hf_model, torch, transformers

from llm_convert import load_hf, save_hf

pytestmark = pytest.mark.convert


def _add_mtp_layer(folder) -> dict:
    """Give a saved tiny DeepSeek-V3 folder a Hub-style MTP layer (random values)."""
    tensors = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    last, mtp = config["num_hidden_layers"] - 1, config["num_hidden_layers"]
    rng = np.random.default_rng(0)
    prefix = f"model.layers.{last}."
    for name, value in list(tensors.items()):
        if name.startswith(prefix):  # a MoE decoder layer like the last one
            new = f"model.layers.{mtp}." + name[len(prefix) :]
            tensors[new] = (value + 0.01 * rng.normal(size=value.shape)).astype(value.dtype)
    e = config["hidden_size"]
    extra = {
        "enorm.weight": 1 + 0.1 * rng.normal(size=e),
        "hnorm.weight": 1 + 0.1 * rng.normal(size=e),
        "eh_proj.weight": 0.05 * rng.normal(size=(e, 2 * e)),
        "shared_head.norm.weight": 1 + 0.1 * rng.normal(size=e),
    }
    for name, value in extra.items():
        tensors[f"model.layers.{mtp}.{name}"] = value.astype(np.float32)
    tensors[f"model.layers.{mtp}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[f"model.layers.{mtp}.shared_head.head.weight"] = tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def test_mtp_round_trip(tmp_path):
    hf_dir = tmp_path / "hf"
    hf = build_hf_model("deepseek_v3", hf_dir)
    tensors = _add_mtp_layer(hf_dir)
    model = load_hf(hf_dir)
    assert model.cfg.mtp_num_layers == 1
    eh = np.asarray(model.mtp_0.eh_proj.kernel[...])
    np.testing.assert_array_equal(eh, tensors["model.layers.4.eh_proj.weight"].T)

    back = save_hf(model, tmp_path / "back", dtype="float32")
    round_trip = load_file(str(back / "model.safetensors"))
    assert sorted(round_trip) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(round_trip[name], value, err_msg=name)
    assert json.loads((back / "config.json").read_text())["num_nextn_predict_layers"] == 1

    ids = np.random.default_rng(1).integers(0, 256, (1, 16))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
        got = reloaded(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(ids.astype(np.int32))), want, atol=1e-4)
