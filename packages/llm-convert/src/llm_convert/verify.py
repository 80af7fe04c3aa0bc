"""Compare a native checkpoint with the Hugging Face original on a few prompts (needs torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_convert.errors import ConversionError
from llm_core.io import load as load_native


@dataclass
class VerifyReport:
    max_abs_logit_diff: float
    mean_kl_per_token: float
    tokens: int

    def ok(self, max_diff: float, max_kl: float) -> bool:
        return self.max_abs_logit_diff <= max_diff and self.mean_kl_per_token <= max_kl


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def verify(
    hf_dir: str | Path,
    native_dir: str | Path,
    num_prompts: int = 4,
    seq_len: int = 32,
    seed: int = 0,
) -> VerifyReport:
    """Random token prompts through both models in float32; KL(HF || native) averaged per token."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ConversionError(
            "verify needs torch and transformers: pip install torch transformers"
        ) from None
    model = load_native(native_dir, ["dtype=float32"])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    seq_len = min(seq_len, model.cfg.max_position_embeddings)
    ids = (
        np.random.default_rng(seed)
        .integers(0, model.cfg.vocab_size, (num_prompts, seq_len))
        .astype(np.int32)
    )
    ours = np.asarray(model(ids), np.float64)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids).long()).logits.double().numpy()
    p_log, q_log = _log_softmax(theirs), _log_softmax(ours)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    return VerifyReport(float(np.abs(ours - theirs).max()), float(kl.mean()), int(ids.size))
