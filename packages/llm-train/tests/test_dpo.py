"""DPO: the loss against the published formulas, the preference rows, learning, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_sft import DATA, _encoder, _runs, tokenizer_dir  # noqa: F401 - shared fixture

from llm_core import ConfigError
from llm_train.data.sources import DataError
from llm_train.dpo import dpo_loss

pytestmark = pytest.mark.cpu

RNG = np.random.default_rng(0)
POLICY = RNG.normal(-20, 5, 8)  # [chosen, rejected] x 4 pairs, summed response log-probs
REFERENCE = RNG.normal(-20, 5, 8)
LENGTHS = RNG.integers(3, 12, 8).astype(np.float64)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sigmoid_loss_and_rewards_match_the_paper(smoothing):
    beta = 0.3
    losses, stats = dpo_loss(
        jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(LENGTHS),
        beta=beta, label_smoothing=smoothing, kind="sigmoid",
    )  # fmt: skip
    pc, pr, rc, rr = POLICY[0::2], POLICY[1::2], REFERENCE[0::2], REFERENCE[1::2]
    logits = beta * ((pc - rc) - (pr - rr))
    want = -(1 - smoothing) * _log_sigmoid(logits) - smoothing * _log_sigmoid(-logits)
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(stats["dpo_reward_margin"], np.sum(chosen - rejected), rtol=1e-5)
    assert float(stats["dpo_reward_accuracy"]) == float(np.sum(chosen > rejected))
    np.testing.assert_allclose(stats["dpo_logps_chosen"], pc.sum(), rtol=1e-6)


def test_ipo_uses_length_normalised_log_probs():
    beta = 0.5
    losses, _ = dpo_loss(
        jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(LENGTHS),
        beta=beta, label_smoothing=0.0, kind="ipo",
    )  # fmt: skip
    n_c, n_r = LENGTHS[0::2], LENGTHS[1::2]
    h = (POLICY[0::2] - REFERENCE[0::2]) / n_c - (POLICY[1::2] - REFERENCE[1::2]) / n_r
    np.testing.assert_allclose(losses, (h - 1 / (2 * beta)) ** 2, rtol=1e-5)


def test_small_beta_limit_is_log_two():
    losses, stats = dpo_loss(
        jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(LENGTHS),
        beta=1e-7, label_smoothing=0.0, kind="sigmoid",
    )  # fmt: skip
    np.testing.assert_allclose(losses, math.log(2.0), rtol=1e-5)
    assert abs(float(stats["dpo_reward_margin"])) < 1e-4


def test_preference_rows_train_the_responses_only(tokenizer_dir):  # noqa: F811
    enc = _encoder(tokenizer_dir, "chatml")
    decode = enc.tokenizer.tok.decode
    chosen, rejected = enc.encode_pair(
        {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}, "p.jsonl:1"
    )
    assert [decode(r, skip_special_tokens=False) for r in _runs(chosen.tokens, chosen.mask)] == [
        " 5<|endoftext|>"
    ]
    prompt = [{"role": "user", "content": "Blue?"}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Grass?"}]  # fmt: skip
    chosen, rejected = enc.encode_pair(
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Green."}],
            "rejected": [{"role": "assistant", "content": "Blue."}],
        },
        "p.jsonl:2",
    )
    # only the final reply is scored, not the assistant turn inside the prompt
    assert [decode(r, skip_special_tokens=False) for r in _runs(chosen.tokens, chosen.mask)] == [
        "Green.<|im_end|>\n"
    ]
    assert [
        decode(r, skip_special_tokens=False) for r in _runs(rejected.tokens, rejected.mask)
    ] == ["Blue.<|im_end|>\n"]
    with pytest.raises(DataError, match=r"p\.jsonl:3: preference record has no field 'rejected'"):
        enc.encode_pair({"prompt": "x", "chosen": "y"}, "p.jsonl:3")


def _write_pairs(path: Path, n: int, seed: int) -> None:
    """The preferred answer starts with 'good', the other with 'bad'; the rest is random."""
    rng = np.random.default_rng(seed)
    words = ["sky", "grass", "blue", "green", "one", "two", "three", "user"]
    with open(path, "w") as f:
        for _ in range(n):
            p, a, b = (" ".join(rng.choice(words, 3)) for _ in range(3))
            record = {"prompt": f"{p} =", "chosen": f" good {a}", "rejected": f" bad {b}"}
            f.write(json.dumps(record) + "\n")


@pytest.mark.parametrize("lora", [0, 8])
def test_dpo_raises_held_out_reward_accuracy(tmp_path, tokenizer_dir, lora):  # noqa: F811
    from llm_train.trainer import train

    data = tmp_path / "pairs.jsonl"
    _write_pairs(data, 240, seed=2)
    cfg = tiny_config(
        tmp_path,
        objective="dpo",
        dataset_kind="jsonl",
        dataset_format="preference",
        dataset_path=str(data),
        tokenizer_path=str(tokenizer_dir),
        vocab_size=320,
        packing=False,
        seq_len=63,
        eval_fraction=0.2,
        eval_every=30,
        eval_batches=4,
        steps=30,
        learning_rate=2e-3 if lora == 0 else 1e-2,
        warmup_steps=3,
        lora_rank=lora,
        dpo_beta=0.5,
    )
    result = train(cfg)
    assert abs(result.losses[1] - math.log(2.0)) < 1e-4  # policy == reference at the start
    accuracy = result.evals[30]["eval_dpo_reward_accuracy"]
    assert accuracy > 0.8, result.evals
    assert result.evals[30]["eval_dpo_reward_margin"] > 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"objective": "dpo", "dataset_kind": "jsonl"}, "set objective=dpo together with"),
        (
            {"objective": "dpo", "dataset_format": "preference", "dataset_kind": "jsonl",
             "global_batch_size": 7},
            "global_batch_size must be even",
        ),
        (
            {"objective": "dpo", "dataset_format": "preference", "dataset_kind": "jsonl",
             "global_batch_size": 6, "grad_accum_steps": 2},
            "must be even",
        ),
    ],
)  # fmt: skip
def test_bad_dpo_config_names_the_key(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, **changes)


def test_shipped_dpo_task_file_loads():
    from llm_core import load_config

    cfg = load_config("dpo.yml", [f"chat_template={DATA / 'chatml_style.jinja'}"])
    assert cfg.objective == "dpo" and cfg.dataset_format == "preference"


def test_a_pair_longer_than_a_row_is_refused(tokenizer_dir):  # noqa: F811
    enc = _encoder(tokenizer_dir, None)
    enc.max_pair_tokens = 8
    record = {"prompt": "one two three four five six seven", "chosen": " a", "rejected": " b"}
    with pytest.raises(DataError, match=r"p\.jsonl:4: prompt \+ chosen is \d+ tokens, more than"):
        enc.encode_pair(record, "p.jsonl:4")
