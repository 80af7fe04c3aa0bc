"""A Llama 4 Hub folder is multimodal (Llama4ForConditionalGeneration: `text_config`, tensors under
`language_model.`, a vision encoder and projector beside them): llm-convert takes its language
model, and the logits equal transformers' own language model's, loaded in memory and streamed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tiny_hf import tiny_hf_configs

import llm_core
from llm_convert import hf_to_native, load_hf

pytestmark = pytest.mark.convert


def test_multimodal_llama4_folder_converts_its_language_model(tmp_path):
    text = tiny_hf_configs()["llama4"]
    vision = transformers.Llama4VisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms start at identity; perturb so a wrong norm mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    ids = np.random.default_rng(0).integers(0, text.vocab_size, (1, 20)).astype(np.int32)
    with torch.no_grad():  # its language model (the wrapper's text-only forward fails in 5.x)
        lm = model.language_model
        assert isinstance(lm, transformers.Llama4ForCausalLM)
        want = lm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    got = np.asarray(load_hf(folder)(ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    streamed = np.asarray(llm_core.load(hf_to_native(folder, tmp_path / "native"))(ids))
    np.testing.assert_allclose(streamed, want, atol=1e-4, rtol=0)
