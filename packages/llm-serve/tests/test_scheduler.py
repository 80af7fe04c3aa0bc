"""Continuous batching: joins and leaves between steps, waiting short prompts prefill together,
chunked prefill interleaves with decoding, cancellation frees slot and pages, bounded queue, stop
strings / ids, max_tokens, seeds, logprobs."""

from __future__ import annotations

import pytest
from conftest import tiny_model, tiny_tokenizer

from llm_serve.engine import Engine
from llm_serve.sampling import SamplingParams
from llm_serve.scheduler import QueueFull, Request, Scheduler, generate_text

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines():
    cfg, m = tiny_model()
    return {k: Engine.from_model(cfg, m, kv_cache_kind=k) for k in ("contiguous", "paged")}


def scheduler(engines, kind="contiguous", **kw):
    engine, params = engines[kind]
    return Scheduler(engine, params, tiny_tokenizer(), **kw)


def submit(s, prompt, log=None, **sampling):
    events = []

    def on_event(ev, events=events):
        events.append(ev)
        if log is not None:
            log.append((req.id, ev))

    req = s.submit(Request(list(prompt), SamplingParams(**sampling), on_event))
    req.events = events
    return req


PROMPTS = [[3, 4, 5], list(range(10, 50)), [9] * 7, [1, 2], list(range(60, 75)), [8], [30, 31]]


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_continuous_batching_equals_one_at_a_time(engines, kind):
    alone = [
        generate_text(
            scheduler(engines, kind), p, SamplingParams(max_tokens=4 + i, **GREEDY)
        ).generated
        for i, p in enumerate(PROMPTS)
    ]
    s = scheduler(engines, kind)
    engine = engines[kind][0]
    batch, sizes = engine.prefill_batch, []
    engine.prefill_batch = lambda params, jobs: sizes.append(len(jobs)) or batch(params, jobs)
    reqs = [submit(s, p, max_tokens=4 + i, **GREEDY) for i, p in enumerate(PROMPTS)]
    peak, steps = 0, 0
    try:
        while s._has_work():
            s.step()
            steps += 1
            peak = max(peak, s.stats()["active_slots"])
    finally:
        engine.prefill_batch = batch
    assert max(sizes) >= 2  # waiting short prompts were prefilled together
    assert [r.generated for r in reqs] == alone
    assert peak == 4  # every slot in use; 7 requests on 4 slots means slots were reused
    assert all(r.finish_reason == "length" for r in reqs)
    assert steps < sum(4 + i for i in range(7))  # batched, not one after another
    stats = s.stats()
    assert stats["active_slots"] == 0
    if kind == "paged":
        assert stats["free_pages"] == stats["total_pages"]


def test_long_prompt_prefill_interleaves_with_decoding(engines):
    s = scheduler(engines)
    log = []
    short = submit(s, [5, 6, 7], log, max_tokens=12, **GREEDY)
    s.step()  # short is prefilled and starts decoding
    long = submit(s, list(range(1, 91)), log, max_tokens=2, **GREEDY)  # 3 chunks of <= 32
    s.run_until_idle()
    order = [rid for rid, ev in log if ev.token_id is not None]
    first_long = order.index(long.id)
    # the short request kept decoding during the long prompt's 3 prefill steps
    assert order[:first_long].count(short.id) >= 3
    alone = generate_text(
        scheduler(engines), list(range(1, 91)), SamplingParams(max_tokens=2, **GREEDY)
    )
    assert long.generated == alone.generated


def test_cancel_frees_slot_and_pages_at_once(engines):
    s = scheduler(engines, "paged")
    reqs = [submit(s, [4, 5, 6], max_tokens=50, **GREEDY) for _ in range(4)]
    for _ in range(3):
        s.step()
    before = s.stats()["free_pages"]
    s.cancel(reqs[1])
    s.step()
    stats = s.stats()
    assert stats["active_slots"] == 3
    assert stats["free_pages"] > before
    assert reqs[1].events[-1].finish_reason == "abort"
    for r in reqs:
        s.cancel(r)
    s.step()
    assert s.stats()["free_pages"] == s.stats()["total_pages"]
    assert not s._has_work()


def test_full_queue_refuses(engines):
    s = scheduler(engines, max_queue=2)
    submit(s, [1], max_tokens=1)
    submit(s, [2], max_tokens=1)
    with pytest.raises(QueueFull):
        submit(s, [3], max_tokens=1)
    s.run_until_idle()
    submit(s, [3], max_tokens=1)  # room again


def test_stop_string_and_stop_token(engines):
    prompt = tiny_tokenizer().encode("the quick brown fox")
    full = generate_text(scheduler(engines), prompt, SamplingParams(max_tokens=20, **GREEDY))
    cut = full.text[len(full.text) // 2 :][:3]
    assert cut
    stopped = generate_text(
        scheduler(engines), prompt, SamplingParams(max_tokens=20, stop=[cut], **GREEDY)
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(cut)]
    by_id = generate_text(
        scheduler(engines),
        prompt,
        SamplingParams(max_tokens=20, stop_token_ids=[full.generated[3]], **GREEDY),
    )
    assert by_id.finish_reason == "stop"
    assert by_id.generated == full.generated[: full.generated.index(full.generated[3]) + 1]


def test_context_limit_ends_with_length(engines):
    s = scheduler(engines)
    req = generate_text(s, list(range(1, 121)), SamplingParams(max_tokens=50, **GREEDY))
    assert len(req.generated) == 8  # 128 - 120
    assert req.finish_reason == "length"
    with pytest.raises(ValueError, match="kv_cache_max_length"):
        s.submit(Request(list(range(128)), SamplingParams(), lambda ev: None))


def test_seed_reproducible_and_logprobs(engines):
    def run(seed):
        return generate_text(
            scheduler(engines),
            [5, 6, 7],
            SamplingParams(max_tokens=16, temperature=1.0, seed=seed, logprobs=3, ignore_eos=True),
        )

    a, b, c = run(11), run(11), run(12)
    assert a.generated == b.generated and a.text == b.text
    assert a.generated != c.generated
    # the same seed gives the same tokens when other requests share the batch
    s = scheduler(engines)
    submit(s, [9, 9], max_tokens=16, temperature=1.0, seed=3)
    mixed = submit(
        s, [5, 6, 7], max_tokens=16, temperature=1.0, seed=11, ignore_eos=True, logprobs=3
    )
    s.run_until_idle()
    assert mixed.generated == a.generated
    token_events = [e for e in mixed.events if e.token_id is not None]
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in token_events)


def test_request_larger_than_the_page_pool_is_refused(engines):
    cfg, m = tiny_model()
    engine, params = Engine.from_model(cfg, m, kv_cache_kind="paged", num_pages=5)  # 4 pages of 8
    s = Scheduler(engine, params, tiny_tokenizer())
    with pytest.raises(ValueError, match="kv_num_pages"):
        s.submit(Request([1] * 20, SamplingParams(max_tokens=20), lambda ev: None))
    ok = generate_text(s, [1] * 20, SamplingParams(max_tokens=12, **GREEDY))
    assert len(ok.generated) == 12


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_prompt_scoring_with_and_without_generation(engines, kind):
    engine, params = engines[kind]
    prompt = list(range(1, 41))  # two prefill chunks
    want = engine.prefill(params, prompt, prompt_logprobs=2)
    s = scheduler(engines, kind)
    only = submit(s, prompt, max_tokens=0, prompt_logprobs=2, **GREEDY)
    both = submit(s, prompt, max_tokens=3, prompt_logprobs=2, **GREEDY)
    s.run_until_idle()
    assert only.finish_reason == "length" and only.generated == []
    assert [e.finish_reason for e in only.events] == ["length"]
    assert both.finish_reason == "length" and len(both.generated) == 3
    for req in (only, both):
        assert req.prompt_logprobs[0] is None and req.prompt_top_logprobs[0] is None
        assert req.prompt_logprobs[1:] == pytest.approx(want.prompt_logprobs[1:].tolist(), abs=1e-5)
        assert len(req.prompt_top_logprobs) == len(prompt)
        assert all(len(t) == 2 for t in req.prompt_top_logprobs[1:])
    assert all(r is None for r in s.slots)
    if engine.allocator is not None:
        assert engine.allocator.num_free == engine.allocator.capacity


def _choices(s, prompt, n, **sampling):
    params = SamplingParams(**sampling)
    reqs = [Request(list(prompt), params.for_choice(i), lambda ev: None) for i in range(n)]
    s.submit_group(reqs)
    return reqs


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_n_choices_prefill_once_seeded_and_free_everything(engines, kind):
    s = scheduler(engines, kind)
    engine = engines[kind][0]
    calls = []  # one entry per prompt prefilled (one chunk or a row of a batched prefill)
    chunk, batch = engine.prefill_chunk, engine.prefill_batch
    engine.prefill_chunk = lambda *a: calls.append(1) or chunk(*a)
    engine.prefill_batch = lambda params, jobs: calls.extend(jobs) or batch(params, jobs)
    try:
        other = submit(s, [7, 8, 9], max_tokens=5, **GREEDY)  # shares the batch with the group
        runs = []
        for _ in range(2):
            reqs = _choices(s, [3, 4, 5, 6], 3, max_tokens=12, temperature=1.0, seed=11)
            s.run_until_idle()
            runs.append([r.generated for r in reqs])
        assert len(calls) == 3  # one prefill per group (+ `other`'s), not one per choice
    finally:
        engine.prefill_chunk, engine.prefill_batch = chunk, batch
    assert other.finish_reason == "length"
    assert runs[0] == runs[1]  # reproducible from the seed
    assert all(len(g) == 12 for g in runs[0])
    assert len({tuple(g) for g in runs[0]}) > 1  # the choices differ
    assert [r.index for r in reqs] == [0, 1, 2] and reqs[0].group is reqs
    # choice 0 is the plain request with that seed
    alone = generate_text(
        scheduler(engines, kind), [3, 4, 5, 6], SamplingParams(max_tokens=12, seed=11)
    )
    assert alone.generated == runs[0][0]
    greedy = _choices(s, [3, 4, 5, 6], 3, max_tokens=6, **GREEDY)
    s.run_until_idle()
    assert greedy[0].generated == greedy[1].generated == greedy[2].generated
    stats = s.stats()
    assert stats["active_slots"] == 0 and not s.prefilling
    if kind == "paged":
        assert stats["free_pages"] == stats["total_pages"]


def test_n_choices_share_the_prompt_pages(engines):
    """Paged: 3 choices of a 40-token prompt share the pages it fills; each owns the partial page
    on. Every choice decodes as it does alone, and all pages come back."""
    engine, _ = engines["paged"]
    prompt = list(range(10, 50))
    full = len(prompt) // engine.page_size
    assert full >= 2
    s = scheduler(engines, "paged")  # (a scheduler starts the engine's pool afresh)
    alloc = engine.allocator
    runs = []
    for sampling in (GREEDY, dict(temperature=1.0, seed=5)):
        reqs = _choices(s, prompt, 3, max_tokens=8, **sampling)
        s.step()  # admit and prefill: every choice holds its pages now
        tables = [alloc.owned(s.slots.index(r)) for r in reqs]
        assert tables[1][:full] == tables[2][:full] == tables[0][:full]
        own = [page for t in tables for page in t[full:]]
        assert len(set(own)) == len(own) > 0
        assert alloc.capacity - alloc.num_free == full + len(own)
        s.run_until_idle()
        runs.append((sampling, [r.generated for r in reqs]))
    assert alloc.num_free == alloc.capacity
    for sampling, generated in runs:
        for i, got in enumerate(generated):
            params = SamplingParams(max_tokens=8, **sampling).for_choice(i)
            assert got == generate_text(scheduler(engines, "paged"), prompt, params).generated


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_n_choices_wait_for_slots_and_cancel_frees_all(engines, kind):
    s = scheduler(engines, kind)
    busy = [submit(s, [5, i + 1], max_tokens=4, **GREEDY) for i in range(2)]
    s.step()
    reqs = _choices(s, [3, 4], 3, max_tokens=30, temperature=1.0, seed=1)
    s.step()
    assert s.stats()["active_slots"] == 2 and s.stats()["queue_depth"] == 1  # 2 free < 3
    while s.queue:
        s.step()
    assert all(r.finish_reason == "length" for r in busy)
    s.step()
    assert all(r.generated for r in reqs)
    s.cancel(reqs[1])  # cancelling one choice cancels the group
    s.step()
    assert all(r.finish_reason == "abort" for r in reqs)
    stats = s.stats()
    assert stats["active_slots"] == 0
    if kind == "paged":
        assert stats["free_pages"] == stats["total_pages"]
    with pytest.raises(ValueError, match="max_decode_slots"):
        _choices(s, [3, 4], 5, max_tokens=4)
