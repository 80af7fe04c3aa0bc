"""Prefix caching: a prompt that starts like a cached one prefills only the rest, with the same
tokens as without the cache; scoring requests are prefilled whole; entries are bounded (LRU)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_model
from test_engine import decode_batch, greedy_reference

from llm_core import ConfigError
from llm_serve.engine import Engine
from llm_serve.kv_pages import PageAllocator
from llm_serve.prefix_cache import PrefixCache

SYSTEM = list(range(30, 70))  # 40 shared tokens
PROMPTS = [[*SYSTEM, 3, 4, 5], [*SYSTEM, 9, 8], [*SYSTEM[:20], 1, 2], [7, 7, 7]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_cached_prefixes_give_the_same_tokens(model, kind):
    cfg, m = model
    cached, params = Engine.from_model(cfg.replace(prefix_cache_entries=4), m, kv_cache_kind=kind)
    plain, _ = Engine.from_model(cfg, m, kv_cache_kind=kind)
    reference = greedy_reference(m)
    reused = []
    for prompt in PROMPTS:
        job = cached.start_prefill(prompt)
        reused.append(job.reused)
        got, _ = decode_batch(cached, params, [prompt], 8)
        assert got == decode_batch(plain, params, [prompt], 8)[0] == [reference(prompt, 8)]
    # the first prompt finds nothing; the second shares 40 tokens, the third 20 (whole pages reused)
    page = cfg.kv_page_size
    assert page < 20 and reused == [0, 40 // page * page, 20 // page * page, 0]
    assert cached.prefix_cache.hit_tokens == 2 * sum(reused)  # start_prefill, then decode_batch


def test_scoring_prompts_are_prefilled_whole(model):
    cfg, m = model
    engine, params = Engine.from_model(cfg.replace(prefix_cache_entries=2), m)
    engine.prefill(params, PROMPTS[0])
    assert engine.start_prefill(PROMPTS[1]).reused == 40 // cfg.kv_page_size * cfg.kv_page_size
    assert engine.start_prefill(PROMPTS[1], prompt_logprobs=0).reused == 0


def test_entries_are_least_recently_used_and_bounded():
    cache = PrefixCache(max_entries=2, block=4)
    a, b, c = (np.arange(k, k + 12, dtype=np.int32) for k in (0, 100, 200))
    for tokens in (a, b):
        cache.store(tokens, None, 16)
    assert cache.lookup(np.concatenate([a[:9], [7]]))[1] == 8  # a used: b is now the oldest
    cache.store(c, None, 16)
    assert len(cache) == 2
    assert cache.lookup(np.concatenate([b[:8], [1]]))[0] is None  # b was evicted
    assert cache.lookup(np.concatenate([a[:8], [1]]))[1] == 8
    assert cache.lookup(a)[1] == 8  # the last token is always prefilled (its logits are needed)
    cache.store(np.arange(3, dtype=np.int32), None, 16)  # shorter than a block: not kept
    assert len(cache) == 2


def test_negative_entries_name_the_key(model):
    cfg, m = model
    with pytest.raises(ConfigError, match="prefix_cache_entries"):
        Engine.from_model(cfg.replace(prefix_cache_entries=-1), m)


def test_paged_slots_share_prompt_pages_and_return_them(model):
    cfg, m = model
    engine, params = Engine.from_model(
        cfg.replace(prefix_cache_entries=4), m, kv_cache_kind="paged"
    )
    plain, _ = Engine.from_model(cfg, m, kv_cache_kind="paged")
    page = cfg.kv_page_size
    got, state = decode_batch(engine, params, PROMPTS, 8)  # all four in one decode state
    want, _ = decode_batch(plain, params, PROMPTS, 8)
    assert got == want == [greedy_reference(m)(p, 8) for p in PROMPTS]
    a, table = engine.allocator, engine.allocator.table
    full, part = 40 // page, 20 // page  # full pages of the system prompt, of its first half
    assert (table[1, :full] == table[0, :full]).all()  # shared by reference
    assert (table[2, :part] == table[0, :part]).all()
    assert table[2, part] != table[0, part]  # where the prompts differ: its own page
    assert not set(table[3][table[3] > 0]) & set(table[0][table[0] > 0])
    in_use = a.capacity - a.num_free
    assert in_use == plain.allocator.capacity - plain.allocator.num_free - full - part
    for slot in range(4):
        state = engine.release(state, slot)
    assert a.num_free == a.capacity  # every page back (the indexed ones stay reusable)
    hits = a.shared_hits
    a.reserve(0, len(PROMPTS[1]) + 1, PROMPTS[1])  # the system prompt's pages, from the index
    assert a.shared_hits == hits + full and a.shared(0) == full


def test_allocator_takes_idle_indexed_pages_last():
    a = PageAllocator(num_pages=5, page_size=2, slots=2, pages_per_slot=4, share_prefixes=True)
    prompt = [1, 2, 3, 4, 5]
    assert a.reserve(0, 6, prompt) == [1, 2, 3]  # two full prompt pages, one for the rest
    a.register(0, prompt)
    a.release(0)
    assert a.num_free == 4
    assert a.reserve(1, 2) == [3]  # a fresh page comes from the free list, not the index
    assert a.reserve(0, 6, prompt) == [1, 2, 4] and a.shared(0) == 2
    a.release(0)
    a.release(1)
    assert a.reserve(1, 8) == [3, 4, 2, 1]  # the idle indexed pages are taken back last
    assert a.num_free == 0
    a.release(1)
    assert a.reserve(0, 6, prompt) == [3, 4, 2] and a.shared(0) == 0  # the index was dropped
