"""Gradient accumulation for the post-training objectives: DPO keeps each pair in one microbatch and
GRPO rows carry their advantages, so accumulating over microbatches equals the big batch."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_step import batch, make_steps

from llm_core import ConfigError

pytestmark = pytest.mark.cpu

SGD = {"warmup_steps": 0, "optimizer": "sgd", "adam_b1": 0.0, "lr_schedule": "constant"}
DPO = {"objective": "dpo", "dataset_format": "preference", "dataset_kind": "jsonl", **SGD}
GRPO = {
    "objective": "grpo", "dataset_format": "prompts", "dataset_kind": "jsonl",
    "reward_functions": json.dumps(["llm_train.rewards:exact_match_number"]),
    "max_completion_length": 8, "num_generations": 2, "grpo_beta": 0.1, **SGD,
}  # fmt: skip


def response_rows(cfg, seed: int) -> dict:
    """A random batch whose trained tokens are a tail of each row (like a response)."""
    bt = batch(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    starts = rng.integers(4, cfg.seq_len // 2, cfg.global_batch_size)
    bt["weights"] = (np.arange(cfg.seq_len)[None] >= starts[:, None]).astype(np.float32)
    bt["weights"][:, -1] = 0.0
    return bt


def assert_same_step(cfg1, cfg2, bt, stat_keys):
    s1, s2 = make_steps(cfg1), make_steps(cfg2)
    st1, m1 = s1.train_step(s1.init(), bt)
    st2, m2 = s2.train_step(s2.init(), bt)
    for key in ("loss", "grad_norm", "tokens", *stat_keys):
        np.testing.assert_allclose(
            float(m1[key]), float(m2[key]), rtol=1e-5, atol=1e-7, err_msg=key
        )
    for x, y in zip(jax.tree.leaves(st1["params"]), jax.tree.leaves(st2["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    return m1


def test_dpo_accumulation_matches_the_big_batch(tmp_path):
    cfg1 = tiny_config(tmp_path, **DPO)
    cfg2 = tiny_config(tmp_path, grad_accum_steps=2, **DPO)
    bt = response_rows(cfg1, seed=3)
    # one step from the reference weights, then a second one where policy != reference
    s = make_steps(cfg1)
    moved, _ = s.train_step(s.init(), response_rows(cfg1, seed=4))
    keys = ("dpo_reward_margin", "dpo_reward_accuracy", "dpo_logps_chosen", "dpo_logps_rejected")
    s2 = make_steps(cfg2)
    _, m1 = s.train_step(jax.tree.map(np.copy, moved), bt)
    _, m2 = s2.train_step(jax.tree.map(np.copy, moved), bt)
    for key in ("loss", "grad_norm", *keys):
        np.testing.assert_allclose(
            float(m1[key]), float(m2[key]), rtol=1e-5, atol=1e-7, err_msg=key
        )
    assert (
        float(m1["dpo_reward_margin"]) != 0.0
    )  # the pairs really were scored against the reference
    assert_same_step(cfg1, cfg2, bt, keys)


def test_grpo_accumulation_matches_the_big_batch(tmp_path):
    cfg1 = tiny_config(tmp_path, **GRPO)
    cfg2 = tiny_config(tmp_path, grad_accum_steps=4, **GRPO)
    bt = response_rows(cfg1, seed=5)
    rng = np.random.default_rng(6)
    bt["advantages"] = rng.normal(size=cfg1.global_batch_size).astype(np.float32)
    bt["old_logps"] = rng.normal(-3.0, 0.3, bt["weights"].shape).astype(np.float32)
    bt["ref_logps"] = rng.normal(-3.0, 0.3, bt["weights"].shape).astype(np.float32)
    assert_same_step(cfg1, cfg2, bt, ("grpo_kl", "grpo_clip_fraction"))


def test_dpo_microbatches_must_hold_whole_pairs(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        tiny_config(tmp_path, global_batch_size=6, grad_accum_steps=2, **DPO)
