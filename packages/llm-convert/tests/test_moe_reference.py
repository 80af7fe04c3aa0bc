"""Our per-layer load-balancing loss equals transformers' Mixtral `load_balancing_loss_func`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import torch

from llm_core.layers.moe import Routing, expert_counts, load_balancing_loss, route

pytestmark = pytest.mark.convert


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(48, 8, 2), (37, 16, 4), (10, 4, 1)])
def test_load_balancing_loss_matches_transformers(tokens, experts, top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = np.random.default_rng(tokens).normal(size=(tokens, experts)).astype(np.float32)
    theirs = load_balancing_loss_func((torch.from_numpy(logits),), experts, top_k).item()
    _, chosen, probs = route(jnp.asarray(logits), Routing(top_k))
    ours = float(load_balancing_loss(probs, expert_counts(chosen, experts)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
