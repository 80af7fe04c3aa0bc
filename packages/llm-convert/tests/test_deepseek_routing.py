"""DeepSeek routing against transformers' own routers, and the 0.0-versus--inf group mask both ways.

transformers' DeepseekV3 router masks experts of dropped groups with -inf (as DeepSeek's reference
code does); the Hub's remote DeepSeek-V3 code and transformers' DeepseekV2 use 0.0. They differ only
when every eligible biased score is <= 0: then a 0.0 mask lets dropped experts win the top-k.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import torch, transformers

from llm_core.layers.moe import Routing, route

pytestmark = pytest.mark.convert
T, E, K, GROUPS, TOPK_GROUPS = 64, 16, 4, 4, 2


def _v3_router(bias: np.ndarray):
    cfg = transformers.DeepseekV3Config(
        hidden_size=E, n_routed_experts=E, num_experts_per_tok=K, n_group=GROUPS,
        topk_group=TOPK_GROUPS, routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # logits = the hidden state itself
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return router


def _ours(logits, bias, mask):
    routing = Routing(K, True, "sigmoid_topk", GROUPS, TOPK_GROUPS, mask, 2.5)
    w, e, _ = route(jnp.asarray(logits), routing, jnp.asarray(bias))
    order = np.argsort(np.asarray(e), axis=1)
    return np.take_along_axis(np.asarray(e), order, 1), np.take_along_axis(np.asarray(w), order, 1)


def _theirs(router, logits):
    with torch.no_grad():
        _, w, e = router(torch.from_numpy(logits))
    e, w = e.numpy(), w.numpy()
    order = np.argsort(e, axis=1)
    return np.take_along_axis(e, order, 1), np.take_along_axis(w, order, 1)


def _remote_code_reference(logits, bias):
    """The Hub's modeling_deepseek.py MoEGate (noaux_tc), in numpy: dropped groups scored 0.0."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    choice = scores + bias
    group_scores = np.sort(choice.reshape(T, GROUPS, -1), axis=-1)[..., -2:].sum(-1)
    best = np.argsort(-group_scores, axis=1, kind="stable")[:, :TOPK_GROUPS]
    keep = np.zeros((T, GROUPS), bool)
    np.put_along_axis(keep, best, True, axis=1)
    masked = np.where(np.repeat(keep, E // GROUPS, axis=1), choice, 0.0)
    experts = np.sort(np.argsort(-masked, axis=1, kind="stable")[:, :K], axis=1)
    w = np.take_along_axis(scores, experts, 1)
    return experts, (w / (w.sum(1, keepdims=True) + 1e-20) * 2.5).astype(np.float32)


@pytest.mark.parametrize("bias_shift", [0.0, -2.0])
def test_v3_router_matches_transformers(bias_shift):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = (0.1 * rng.normal(size=E) + bias_shift).astype(np.float32)
    e_ours, w_ours = _ours(logits, bias, "neg_inf")
    e_theirs, w_theirs = _theirs(_v3_router(bias), logits)
    np.testing.assert_array_equal(e_ours, e_theirs)
    np.testing.assert_allclose(w_ours, w_theirs, rtol=1e-5, atol=1e-6)


def test_group_mask_zero_versus_neg_inf():
    """With every biased score negative, the 0.0 mask (remote code) chooses dropped-group experts and
    -inf does not; each of our modes matches its reference exactly."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = np.full(E, -2.0, np.float32)  # sigmoid < 1, so every biased score is < 0
    e_zero, w_zero = _ours(logits, bias, "zero")
    e_ref, w_ref = _remote_code_reference(logits, bias)
    np.testing.assert_array_equal(e_zero, e_ref)
    np.testing.assert_allclose(w_zero, w_ref, rtol=1e-5)
    e_inf, _ = _ours(logits, bias, "neg_inf")
    assert (e_zero != e_inf).any(axis=1).mean() > 0.5  # the two rules really disagree here


def test_v2_group_limited_router_matches_transformers():
    cfg = transformers.DeepseekV2Config(
        hidden_size=E, n_routed_experts=E, num_experts_per_tok=K, n_group=GROUPS,
        topk_group=TOPK_GROUPS, topk_method="group_limited_greedy", routed_scaling_factor=16.0,
        num_attention_heads=4,
    )  # fmt: skip
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    router = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    logits = np.random.default_rng(3).normal(size=(T, E)).astype(np.float32)
    routing = Routing(K, False, "softmax_topk", GROUPS, TOPK_GROUPS, "zero", 16.0)
    w, e, _ = route(jnp.asarray(logits), routing)
    order = np.argsort(np.asarray(e), axis=1)
    e_theirs, w_theirs = _theirs(router, logits)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(e), order, 1), e_theirs)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1), w_theirs, rtol=1e-5)
