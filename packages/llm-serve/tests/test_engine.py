"""Engine correctness: greedy == full forward; batched == one at a time; paged == contiguous;
chunked prefill == whole prefill; bucketing bounds compiles; released slots and pages are reusable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from llm_serve.engine import Engine, next_bucket
from llm_serve.sampling import SamplingParams

PROMPTS = [
    [5, 9, 13, 2],
    list(range(20, 61)),  # 41 tokens: two prefill chunks of <= 32
    [7],
    list(range(100, 117)),
]
STEPS = 12


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuation by re-running the whole sequence without a cache (one compiled length)."""
    _, m = model
    graphdef, state = nnx.split(m)

    @jax.jit
    def logits_at(state, ids, last):
        return nnx.merge(graphdef, state)(ids)[0, last]

    def run(prompt, n):
        ids = list(prompt)
        for _ in range(n):
            padded = np.zeros((1, 128), np.int32)
            padded[0, : len(ids)] = ids
            ids.append(int(jnp.argmax(logits_at(state, padded, len(ids) - 1))))
        return ids[len(prompt) :]

    return run


@pytest.fixture(scope="module")
def engines(model):
    cfg, m = model
    return {kind: Engine.from_model(cfg, m, kv_cache_kind=kind) for kind in ("contiguous", "paged")}


def decode_batch(engine, params, prompts, steps, slots=None):
    """Insert every prompt into its own slot, then decode all together."""
    state = engine.init_decode_state()
    slots = slots or list(range(len(prompts)))
    outs = {}
    for slot, p in zip(slots, prompts):
        prefix = engine.prefill(params, p, SamplingParams(temperature=0.0))
        state = engine.insert(prefix, state, slot)
        outs[slot] = [int(prefix.first.tokens[0])]
    for _ in range(steps - 1):
        state, out = engine.generate(params, state)
        for slot in outs:
            outs[slot].append(int(out.tokens[slot]))
    return [outs[s] for s in slots], state


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_greedy_batched_equals_full_forward(engines, reference, kind):
    engine, params = engines[kind]
    got, _ = decode_batch(engine, params, PROMPTS, STEPS)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == reference(prompt, STEPS)


def test_batched_equals_one_at_a_time_and_paged_equals_contiguous(engines):
    engine, params = engines["contiguous"]
    batched, _ = decode_batch(engine, params, PROMPTS, STEPS)
    alone = [decode_batch(engine, params, [p], STEPS, slots=[2])[0][0] for p in PROMPTS]
    assert batched == alone
    paged_engine, _ = engines["paged"]
    paged, _ = decode_batch(paged_engine, params, PROMPTS, STEPS, slots=[3, 1, 0, 2])
    assert paged == batched


def test_chunked_prefill_equals_whole_prefill(model):
    cfg, m = model
    chunked, params = Engine.from_model(cfg, m)  # max_prefill_length = 32
    whole, _ = Engine.from_model(cfg.replace(max_prefill_length=128), m)
    prompt = list(range(1, 91))  # 3 chunks
    a = chunked.prefill(params, prompt)
    b = whole.prefill(params, prompt)
    assert a.cache.max_len == b.cache.max_len == 128
    np.testing.assert_allclose(a.cache.k[:, :, :90], b.cache.k[:, :, :90], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.cache.v[:, :, :90], b.cache.v[:, :, :90], atol=1e-5, rtol=1e-5)
    assert int(a.first.tokens[0]) == int(b.first.tokens[0])
    np.testing.assert_allclose(a.first.logprobs, b.first.logprobs, atol=1e-5)


def test_prompt_lengths_share_compiled_buckets(engines):
    engine, params = engines["contiguous"]
    for n in range(17, 33):  # all in the 32 bucket
        engine.prefill(params, list(range(1, n + 1)))
    before = engine._prefill_fn._cache_size()
    for n in (18, 25, 31, 32):
        engine.prefill(params, list(range(1, n + 1)))
    assert engine._prefill_fn._cache_size() == before
    assert [next_bucket(n, 128, 8) for n in (1, 16, 17, 33, 100, 200)] == [16, 16, 32, 64, 128, 128]


def test_release_returns_pages_and_slot_is_reusable(engines):
    engine, params = engines["paged"]
    first, state = decode_batch(engine, params, PROMPTS[:2], 6)
    alloc = engine.allocator  # init_decode_state starts a fresh pool
    assert alloc.num_free < alloc.capacity
    for slot in (0, 1):
        state = engine.release(state, slot)
    assert alloc.num_free == alloc.capacity
    assert not bool(state.active.any())
    # the reused slots (stale KV from the last requests) give the same tokens
    prefix = engine.prefill(params, PROMPTS[1], SamplingParams(temperature=0.0))
    state = engine.insert(prefix, state, 0)
    tokens = [int(prefix.first.tokens[0])]
    for _ in range(5):
        state, out = engine.generate(params, state)
        tokens.append(int(out.tokens[0]))
    assert tokens == first[1]


def test_prompt_too_long_names_the_limit(engines):
    engine, params = engines["contiguous"]
    with pytest.raises(ValueError, match="kv_cache_max_length"):
        engine.prefill(params, list(range(128)))


def test_paged_max_length_must_be_page_multiple(model):
    from llm_core import ConfigError

    cfg, m = model
    with pytest.raises(ConfigError, match="kv_page_size"):
        Engine.from_model(cfg.replace(kv_cache_max_length=100), m, kv_cache_kind="paged")


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_length_follows_the_longest_request(engines, kind):
    engine, params = engines[kind]
    (short, _), state = decode_batch(engine, params, [[5, 6, 7], list(range(1, 71))], 3)
    assert engine.decode_len == 128  # the 70-token prompt needs the 128 bucket
    if kind == "contiguous":
        assert state.cache.max_len == 128
    state = engine.release(state, 1)
    state, out = engine.generate(params, state)
    assert engine.decode_len == 64  # cut back once the long request left
    if kind == "contiguous":
        assert state.cache.max_len == 64
    alone, _ = decode_batch(engine, params, [[5, 6, 7]], 4)
    assert [*short, int(out.tokens[0])] == alone[0]


def test_layerwise_fast_path_equals_forward_with_cache(model, reference):
    from llm_core import KVCache
    from llm_serve.layerwise import Layerwise

    cfg, m = model
    lw = Layerwise(m)
    ids = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]] * 2)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    a_logits, a_cache = lw.forward_with_cache(lw.params, ids, pos, KVCache.init(cfg, 2, 16))
    b_logits, b_cache = m.forward_with_cache(ids, pos, KVCache.init(cfg, 2, 16))
    np.testing.assert_allclose(a_logits, b_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a_cache.k, b_cache.k, atol=1e-6)
    # and the engine on the plain forward_with_cache path gives the reference tokens too
    plain, params = Engine.from_model(cfg, m, layerwise=False)
    got, _ = decode_batch(plain, params, PROMPTS[:2], 6)
    assert got == [reference(p, 6) for p in PROMPTS[:2]]
