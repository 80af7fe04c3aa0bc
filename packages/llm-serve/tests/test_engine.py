"""Engine correctness: greedy == full forward (also for Gemma 2/3 attention patterns, a tail segment
and MoE); batched == one at a time; paged == contiguous; decode view == stacked model; chunked
prefill == whole prefill; batched prefill == one prompt at a time; bucketing bounds
compiles; released slots and pages are reusable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from llm_core import map_layer_caches, unstack_layers
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


def greedy_reference(m):
    """Greedy continuation by re-running the whole sequence without a cache (one compiled length)."""
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
def reference(model):
    return greedy_reference(model[1])


@pytest.fixture(scope="module")
def engines(model):
    cfg, m = model
    return {kind: Engine.from_model(cfg, m, kv_cache_kind=kind) for kind in ("contiguous", "paged")}


def decode_batch(engine, params, prompts, steps, slots=None):
    """Insert every prompt into its own slot, then decode all together."""
    greedy = SamplingParams(temperature=0.0)
    return decode_prefixes(engine, params, [engine.prefill(params, p, greedy) for p in prompts],
                           steps, slots)  # fmt: skip


def decode_prefixes(engine, params, prefixes, steps, slots=None):
    """Insert every prefix into its own slot, then decode all together."""
    state = engine.init_decode_state()
    slots = slots or list(range(len(prefixes)))
    outs = {}
    for slot, prefix in zip(slots, prefixes):
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


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_prefill_batch_equals_one_at_a_time(engines, reference, kind):
    engine, params = engines[kind]
    prompts = [[5, 9, 13, 2], [7], list(range(1, 11))]  # one cache bucket; 3 rows padded to 4
    greedy = SamplingParams(temperature=0.0)
    jobs = [engine.start_prefill(p, greedy) for p in prompts]
    batched = engine.prefill_batch(params, jobs)
    for p, prefix in zip(prompts, batched):
        alone = engine.prefill(params, p, greedy)
        assert prefix.length == alone.length and prefix.capacity == alone.capacity
        for x, y in zip(jax.tree.leaves(prefix.cache), jax.tree.leaves(alone.cache), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(prefix.first.logprobs, alone.first.logprobs, atol=1e-5)
    got, _ = decode_prefixes(engine, params, batched, STEPS)
    assert got == [reference(p, STEPS) for p in prompts]
    long_job = engine.start_prefill(PROMPTS[1], greedy)  # 41 tokens: two chunks
    with pytest.raises(ValueError, match="job 1 is not batchable"):
        engine.prefill_batch(params, [engine.start_prefill([3], greedy), long_job])


def test_chunked_prefill_equals_whole_prefill(model):
    cfg, m = model
    chunked, params = Engine.from_model(cfg, m)  # max_prefill_length = 32
    whole, _ = Engine.from_model(cfg.replace(max_prefill_length=128), m)
    prompt = list(range(1, 91))  # 3 chunks
    a = chunked.prefill(params, prompt)
    b = whole.prefill(params, prompt)
    assert a.capacity == b.capacity == 128
    first_90 = lambda cache: jax.tree.leaves(map_layer_caches(lambda c: c.resize(90), cache))  # noqa: E731
    for x, y in zip(first_90(a.cache), first_90(b.cache), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
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
        assert cache_lengths(state.cache) == {128}
    state = engine.release(state, 1)
    state, out = engine.generate(params, state)
    assert engine.decode_len == 64  # cut back once the long request left
    if kind == "contiguous":
        assert cache_lengths(state.cache) == {64}
    alone, _ = decode_batch(engine, params, [[5, 6, 7]], 4)
    assert [*short, int(out.tokens[0])] == alone[0]


def cache_lengths(cache) -> set[int]:
    return set(jax.tree.leaves(map_layer_caches(lambda c: c.max_len, cache)))


def test_decode_view_equals_stacked_model(model, reference):
    cfg, m = model
    view = unstack_layers(m)
    ids = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]] * 2)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    a_logits, _ = view.forward_with_cache(ids, pos, view.init_cache(2, 16))
    b_logits, _ = m.forward_with_cache(ids, pos, m.init_cache(2, 16))
    np.testing.assert_allclose(a_logits, b_logits, atol=1e-5, rtol=1e-5)
    # the engine gives the same tokens on either (the default serves the decode view)
    stacked, stacked_params = Engine.from_model(cfg, m, decode_view=False)
    unstacked, unstacked_params = Engine.from_model(cfg, m)
    got, _ = decode_batch(stacked, stacked_params, PROMPTS[:2], 6)
    assert got == decode_batch(unstacked, unstacked_params, PROMPTS[:2], 6)[0]
    assert got == [reference(p, 6) for p in PROMPTS[:2]]
    # the CPU decode view's Linear weights are packed in panels unless packed_matmul=false
    unpacked, unpacked_params = Engine.from_model(cfg.replace(packed_matmul=False), m)

    def paths(params) -> str:
        return " ".join(
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
        )

    assert "panels" in paths(unstacked_params) and "panels" not in paths(unpacked_params)
    assert got == decode_batch(unpacked, unpacked_params, PROMPTS[:2], 6)[0]


# ---------------------------------------------------------------------- families
MOE = ("ffn_kind=moe", "num_experts=4", "num_experts_per_tok=2", "moe_mlp_dim=32")
FAMILIES = {
    # 6 stacked layers (5 local + 1 global) and an unstacked tail layer, a window the prompts exceed
    "gemma3-tail": ("models/gemma3-1b.yml", ("num_layers=7", "sliding_window=8")),
    # a 2-kind pattern (local, global) with attention and final logit soft-caps
    "gemma2": ("models/gemma2-2b.yml", ("num_layers=4", "sliding_window=8")),
    # a dense first layer, then MoE layers (dropless): two stacked segments
    "moe": ("bench-small.yml", ("num_layers=3", "first_num_dense_layers=1", *MOE)),
}
FAMILY_PROMPTS = [[5, 9, 13, 2], list(range(20, 61)), [7]]
FAMILY_STEPS = 8


@pytest.fixture(scope="module")
def family_references():
    return {}


@pytest.mark.parametrize(
    "family,kind,decode_view",
    [(f, k, True) for f in FAMILIES for k in ("contiguous", "paged")]
    + [("gemma3-tail", k, False) for k in ("contiguous", "paged")],  # the stacked model as it is
)
def test_families_greedy_batched_equals_full_forward(family, kind, decode_view, family_references):
    base, overrides = FAMILIES[family]
    cfg, m = tiny_model(*overrides, base=base)
    if family not in family_references:
        run = greedy_reference(m)
        family_references[family] = [run(p, FAMILY_STEPS) for p in FAMILY_PROMPTS]
    engine, params = Engine.from_model(cfg, m, kv_cache_kind=kind, decode_view=decode_view)
    got, _ = decode_batch(engine, params, FAMILY_PROMPTS, FAMILY_STEPS, slots=[2, 0, 3])
    assert got == family_references[family]


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_prompt_logprobs_equal_full_forward(model, engines, kind):
    """Prompt scoring (echo): log_softmax at position i-1 gathered at token i, over 1 and 3 chunks."""
    _, m = model
    engine, params = engines[kind]
    full = jax.nn.log_softmax(np.asarray(m(jnp.asarray([list(range(1, 91))]))[0], np.float32), -1)
    for prompt in (list(range(1, 12)), list(range(1, 91))):  # 1 chunk; 3 chunks of <= 32
        n = len(prompt)
        prefix = engine.prefill(params, prompt, SamplingParams(temperature=0.0), prompt_logprobs=3)
        want = np.asarray(full)[np.arange(n - 1), prompt[1:]]
        assert prefix.prompt_logprobs.shape == (n,) and np.isnan(prefix.prompt_logprobs[0])
        np.testing.assert_allclose(prefix.prompt_logprobs[1:], want, atol=1e-4)
        assert prefix.prompt_top_ids.shape == prefix.prompt_top_logprobs.shape == (n, 3)
        top = np.sort(np.asarray(full)[: n - 1], -1)[:, ::-1][:, :3]
        np.testing.assert_allclose(prefix.prompt_top_logprobs[1:], top, atol=1e-4)
        picked = np.take_along_axis(np.asarray(full)[: n - 1], prefix.prompt_top_ids[1:], -1)
        np.testing.assert_allclose(picked, prefix.prompt_top_logprobs[1:], atol=1e-4)
        # scoring changes nothing else
        plain = engine.prefill(params, prompt, SamplingParams(temperature=0.0))
        assert plain.prompt_logprobs is None
        assert int(plain.first.tokens[0]) == int(prefix.first.tokens[0])


def test_int8_kv_cache_decodes_like_the_float_cache(model):
    """kv_cache_dtype=int8 (per-token, per-head scales): the decode step's logits stay within 2% of
    the logit range of the float cache's, greedy tokens agree on most of the prompts (measured:
    every prompt for 12 steps), and the cache takes (D + 4) / (4 D) of the float32 bytes."""
    cfg, m = model
    int8_cfg = cfg.replace(kv_cache_dtype="int8")
    int8_model = nnx.merge(nnx.graphdef(tiny_model("kv_cache_dtype=int8")[1]), nnx.state(m))
    f_engine, f_params = Engine.from_model(cfg, m)
    q_engine, q_params = Engine.from_model(int8_cfg, int8_model)
    floats, _ = decode_batch(f_engine, f_params, PROMPTS, STEPS)
    ints, state = decode_batch(q_engine, q_params, PROMPTS, STEPS)
    assert sum(a == b for a, b in zip(floats, ints)) >= len(PROMPTS) - 1

    def cache_bytes(cache):
        return sum(x.nbytes for x in jax.tree.leaves(cache))

    f_cache = f_engine.init_decode_state().cache
    d = cfg.resolved_head_dim
    np.testing.assert_allclose(
        cache_bytes(state.cache) / cache_bytes(f_cache), (d + 4) / (4 * d), rtol=1e-6
    )

    ids = np.asarray([PROMPTS[1][:24]], np.int32)
    pos = np.arange(24, dtype=np.int32)[None]
    out = {}
    for name, mm in (("float", m), ("int8", int8_model)):
        cache = mm.init_cache(1, 32)
        _, cache = mm.forward_with_cache(ids[:, :23], pos[:, :23], cache)
        out[name], _ = mm.forward_with_cache(ids[:, 23:], pos[:, 23:], cache)
    ref = np.asarray(out["float"])
    assert np.abs(np.asarray(out["int8"]) - ref).max() < 0.02 * (ref.max() - ref.min())


def test_int8_paged_kv_cache_equals_int8_contiguous(model):
    """kv_cache_dtype=int8 with the paged cache: the same greedy tokens as the int8 contiguous
    cache (the same quantized values, stored in pages), at (D + 4) / (4 D) of the float bytes."""
    cfg, m = model
    int8_cfg = cfg.replace(kv_cache_dtype="int8")
    int8_model = nnx.merge(nnx.graphdef(tiny_model("kv_cache_dtype=int8")[1]), nnx.state(m))
    contiguous, c_params = Engine.from_model(int8_cfg, int8_model)
    paged, p_params = Engine.from_model(int8_cfg, int8_model, kv_cache_kind="paged")
    want, _ = decode_batch(contiguous, c_params, PROMPTS, STEPS)
    got, state = decode_batch(paged, p_params, PROMPTS, STEPS)
    assert got == want
    float_paged, _ = Engine.from_model(cfg, m, kv_cache_kind="paged")

    def pool_bytes(cache):  # the pools, without the page tables
        return sum(x.nbytes for x in jax.tree.leaves(cache) if x.dtype != jnp.int32)

    d = cfg.resolved_head_dim
    ratio = pool_bytes(state.cache) / pool_bytes(float_paged.init_decode_state().cache)
    np.testing.assert_allclose(ratio, (d + 4) / (4 * d), rtol=1e-6)
