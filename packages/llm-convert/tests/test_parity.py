"""HF -> native gives the same logits as transformers (fp32, 1e-4), and native -> HF is lossless."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_hf import build_hf_model, torch

from llm_convert import load_hf, save_hf

pytestmark = pytest.mark.convert
SEQ = 24  # longer than any sliding window in the tiny configs


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def _tensors(folder) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_logit_parity_and_round_trip(family_name, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_model = build_hf_model(family_name, hf_dir)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, SEQ)).astype(np.int32)
    expected = _hf_logits(hf_model, ids)

    model = load_hf(hf_dir, dtype="float32")
    ours = np.asarray(model(ids))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    back = save_hf(model, tmp_path / "back", dtype="float32")
    original, round_trip = _tensors(hf_dir), _tensors(back)
    original.pop("lm_head.weight", None) if model.cfg.tie_embeddings else None
    assert sorted(round_trip) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(round_trip[name], tensor, err_msg=name)
