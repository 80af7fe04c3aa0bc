"""The batched sampler: greedy, filters, seeds, penalties, logprobs, settings validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_serve.sampling import SamplingError, SamplingParams, SlotSampling, argmax, sample

V = 50


def run(logits, counts=None, seeds=None, steps=1, **kw):
    """Sample `steps` times from fixed logits [B, V] with the same settings for every row."""
    b = logits.shape[0]
    params = SamplingParams(**kw)
    rows = [
        SlotSampling.of(SamplingParams(**{**kw, "seed": (seeds or [params.seed] * b)[i]}))
        for i in range(b)
    ]
    s = jax.tree.map(lambda *a: jnp.concatenate(a), *rows)
    counts = jnp.zeros((b, V), jnp.int32) if counts is None else counts
    fn = jax.jit(sample)
    out = []
    for t in range(steps):
        out.append(np.asarray(fn(logits, s.replace(step=jnp.full((b,), t)), counts).tokens))
    return np.stack(out, 1)  # [B, steps]


@pytest.fixture(scope="module")
def logits():
    return jax.random.normal(jax.random.PRNGKey(0), (4, V)) * 3


def test_greedy_is_argmax(logits):
    assert (run(logits, temperature=0.0)[:, 0] == np.argmax(logits, -1)).all()


def test_top_k_1_and_tiny_top_p_are_greedy(logits):
    best = np.argmax(logits, -1)
    assert (run(logits, temperature=1.0, top_k=1, steps=20) == best[:, None]).all()
    assert (run(logits, temperature=1.0, top_p=1e-6, steps=20) == best[:, None]).all()
    assert (run(logits, temperature=1.0, min_p=1.0, steps=20) == best[:, None]).all()


def test_top_k_only_picks_the_k_best(logits):
    drawn = run(logits, temperature=5.0, top_k=3, steps=60)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    for row in range(4):
        assert set(drawn[row]) <= set(top3[row])
        assert len(set(drawn[row])) >= 2  # a hot temperature does spread over them


def test_top_p_keeps_the_nucleus():
    lg = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    drawn = run(lg, temperature=1.0, top_p=0.7, steps=80)
    assert set(drawn[0]) == {0, 1}  # 0.5 + 0.3 covers 0.7; token 2 never


def test_min_p_drops_unlikely_tokens():
    lg = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    drawn = run(lg, temperature=1.0, min_p=0.25, steps=80)  # keep p >= 0.125
    assert set(drawn[0]) == {0, 1, 2}


def test_same_seed_same_tokens_other_seed_differs(logits):
    a = run(logits, temperature=1.0, seeds=[7, 7, 7, 7], steps=30)
    b = run(logits, temperature=1.0, seeds=[7, 7, 7, 7], steps=30)
    c = run(logits, temperature=1.0, seeds=[8, 8, 8, 8], steps=30)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    lg = jnp.log(jnp.asarray(probs) + 1e-12)[None].repeat(8, 0)
    drawn = run(lg, temperature=1.0, seeds=list(range(8)), steps=100).ravel()
    freq = np.bincount(drawn, minlength=V)[:3] / drawn.size
    np.testing.assert_allclose(freq, probs[:3], atol=0.06)  # 800 draws: 3 sigma ~ 0.05


def test_penalties_steer_away_from_repeats():
    lg = jnp.zeros((1, V)).at[0, 3].set(1.0)
    counts = jnp.zeros((1, V), jnp.int32).at[0, 3].set(2)
    assert run(lg, counts, temperature=0.0, presence_penalty=1.5)[0, 0] != 3
    assert run(lg, counts, temperature=0.0, frequency_penalty=0.6)[0, 0] != 3
    assert run(lg, counts, temperature=0.0, frequency_penalty=0.4)[0, 0] == 3


def test_logprobs_are_the_model_log_softmax(logits):
    s = SlotSampling.of(SamplingParams(temperature=0.0, logprobs=2))
    s = jax.tree.map(lambda a: jnp.repeat(a, 4, 0), s)
    out = sample(logits, s, jnp.zeros((4, V), jnp.int32))
    ref = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(out.logprobs, ref.max(-1), atol=1e-6)
    np.testing.assert_allclose(out.top_logprobs[:, 0], ref.max(-1), atol=1e-6)
    assert (np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0).all()


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(SamplingError, match=field) as err:
        SamplingParams(**kw)
    assert err.value.field == field


def test_large_seeds_work_and_differ(logits):
    a = run(logits, temperature=1.0, seeds=[2**40 + 1] * 4, steps=20)
    b = run(logits, temperature=1.0, seeds=[2**41 + 1] * 4, steps=20)
    assert (a != b).any()


def test_argmax_is_jnp_argmax_with_ties_nans_and_infs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    x[1, [7, 30]] = 9.0  # tie: the first wins
    x[2, [4, 40]] = np.nan  # NaN: the first NaN, as jnp.argmax
    x[3] = -np.inf
    x[4, 10] = np.inf
    x[5] = 0.0
    np.testing.assert_array_equal(argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), -1))
