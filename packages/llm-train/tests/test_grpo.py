"""GRPO / GSPO: advantages and losses against hand-written references, reward functions, the
in-process rollout loop learning a toy reward, and bad input."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_sft import tokenizer_dir  # noqa: F401 - shared fixture

from llm_core import ConfigError
from llm_train.grpo import advantages, policy_loss
from llm_train.rewards import exact_match_number, format_regex, load_reward_functions

pytestmark = pytest.mark.cpu

RNG = np.random.default_rng(0)
REWARDS = RNG.normal(size=(3, 4))


def _reference_advantage(r, kind):
    out = np.zeros_like(r)
    for p in range(r.shape[0]):
        for i in range(r.shape[1]):
            others = [r[p, j] for j in range(r.shape[1]) if j != i]
            mean = np.mean(r[p])
            if kind == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in r[p]) / (r.shape[1] - 1))
                out[p, i] = (r[p, i] - mean) / (std + 1e-4)
            elif kind == "rloo":
                out[p, i] = r[p, i] - sum(others) / len(others)
            else:
                out[p, i] = r[p, i] - mean
    return out


@pytest.mark.parametrize("kind", ["grpo", "rloo", "drgrpo"])
def test_advantages_match_the_definitions(kind):
    np.testing.assert_allclose(
        advantages(REWARDS, kind), _reference_advantage(REWARDS, kind), rtol=1e-5
    )


B, S = 6, 7
LOGP = RNG.normal(-2, 0.5, (B, S))
OLD = LOGP + RNG.normal(0, 0.3, (B, S))
REF = LOGP + RNG.normal(0, 0.3, (B, S))
ADV = RNG.normal(size=B)
MASK = (RNG.random((B, S)) < 0.7).astype(np.float64)
MASK[:, 0] = 1


def _reference_loss(algo, eps, eps_high, beta, kl):
    total = 0.0
    for b in range(B):
        toks = [t for t in range(S) if MASK[b, t]]
        if kl == "kl":
            kls = [LOGP[b, t] - REF[b, t] for t in toks]
        else:
            kls = [math.exp(REF[b, t] - LOGP[b, t]) - (REF[b, t] - LOGP[b, t]) - 1 for t in toks]
        if algo == "grpo":
            terms = []
            for t in toks:
                ratio = math.exp(LOGP[b, t] - OLD[b, t])
                clipped = min(max(ratio, 1 - eps), 1 + eps_high)
                terms.append(-min(ratio * ADV[b], clipped * ADV[b]))
            seq = sum(terms) / len(toks)
        else:
            s = math.exp(sum(LOGP[b, t] - OLD[b, t] for t in toks) / len(toks))
            clipped = min(max(s, 1 - eps), 1 + eps_high)
            seq = -min(s * ADV[b], clipped * ADV[b])
        total += seq + beta * sum(kls) / len(toks)
    return total


@pytest.mark.parametrize(
    ("algo", "eps_high", "beta", "kl"),
    [("grpo", None, 0.0, "kl"), ("grpo", 0.28, 0.04, "low_var_kl"), ("gspo", None, 0.1, "kl"),
     ("gspo", 0.3, 0.0, "low_var_kl")],
)  # fmt: skip
def test_policy_loss_matches_a_hand_written_reference(algo, eps_high, beta, kl):
    loss, stats = policy_loss(
        jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(REF), jnp.asarray(ADV), jnp.asarray(MASK),
        algo=algo, eps=0.2, eps_high=eps_high, beta=beta, kl_estimator=kl,
    )  # fmt: skip
    want = _reference_loss(algo, 0.2, 0.2 if eps_high is None else eps_high, beta, kl)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert 0 <= float(stats["grpo_clip_fraction"]) <= B


def test_builtin_rewards():
    got = exact_match_number(["q"] * 3, ["it is 12", "12.0 or 13", "none"], answer=[12, 13, 1])
    assert got == [1.0, 1.0, 0.0]
    assert format_regex([], ["<a>x</a>", "x"], pattern=r"^<a>.*</a>$") == [1.0, 0.0]


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (["nowhere.module:fn"], "entry 'nowhere.module:fn' does not import"),
        (["llm_train.rewards"], "must look like 'module:function'"),
        (["llm_train.rewards:format_regex"], "needs reward_format_regex"),
    ],
)
def test_reward_function_errors_name_the_entry(tmp_path, entries, match):
    cfg = tiny_config(
        tmp_path, objective="grpo", dataset_format="prompts", dataset_kind="jsonl",
        reward_functions=json.dumps(entries), max_completion_length=8,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        load_reward_functions(cfg)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"reward_functions": "[]"}, "needs reward_functions"),
        ({"global_batch_size": 6, "num_generations": 4}, "multiple of num_generations"),
        ({"eval_every": 5}, "eval_fraction"),
    ],
)
def test_bad_grpo_config_names_the_key(tmp_path, changes, match):
    base = {"objective": "grpo", "dataset_format": "prompts", "dataset_kind": "jsonl",
            "reward_functions": '["llm_train.rewards:exact_match_number"]',
            "max_completion_length": 8}  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, **{**base, **changes})


def sevens(prompts, completions, **_):
    """Toy verifiable reward: the share of characters of the completion that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def test_grpo_raises_the_mean_reward(tmp_path, tokenizer_dir):  # noqa: F811
    from llm_train.trainer import train

    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"{i % 10} + {i % 7} ="}) + "\n")
    cfg = tiny_config(
        tmp_path,
        objective="grpo",
        dataset_format="prompts",
        dataset_kind="jsonl",
        dataset_path=str(data),
        tokenizer_path=str(tokenizer_dir),
        vocab_size=320,
        reward_functions='["test_grpo:sevens"]',
        num_generations=4,
        global_batch_size=32,
        max_completion_length=8,
        seq_len=32,
        steps=25,
        learning_rate=1e-2,
        warmup_steps=2,
        max_decode_slots=32,
        eval_fraction=0.25,
        eval_every=1,
        eval_batches=1,
    )
    result = train(cfg)
    rewards = [result.rewards[s] for s in sorted(result.rewards)]
    start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert end > start + 0.1, rewards
    # held-out prompts, greedy completions: the reward rises there too
    evals = [result.evals[s]["eval_reward_mean"] for s in range(1, 26)]
    assert evals[-1] > evals[0] + 0.1, evals
    assert result.evals[25]["eval_reward_sevens"] == result.evals[25]["eval_reward_mean"]
    print("train rewards", rewards[0], rewards[-1], "eval rewards", evals)
