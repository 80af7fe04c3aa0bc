"""Continuous batching over an engine: requests join and leave decode slots between steps.

One loop iteration (`step`):

1. requests whose client went away leave their slot (and its pages) at once;
2. waiting requests take free slots (paged cache: only if the pages for prompt + max_tokens are free,
   so a running request never runs out of pages);
3. one chunk (<= max_prefill_length tokens) of the oldest prompt being prefilled runs; a finished
   prefill is inserted into its slot and yields the request's first token. Long prompts are thus
   spread over several iterations, and running requests keep decoding between their chunks. When
   the oldest prompt fits in one chunk, every waiting prompt that does too (and has the same cache
   bucket, no prefix-cache hit and no prompt scoring) is prefilled with it in one batched forward
   (`Engine.prefill_batch`);
4. one decode step for every slot; each request gets its token, and finished requests leave.

A request with `sampling.prompt_logprobs` set gets its prompt scored by the prefill
(`Request.prompt_logprobs` / `prompt_top_logprobs`, filled before its first event); with
`max_tokens=0` it then finishes ("length") without generating a token.

A request for `n` > 1 choices is a group of n Requests with the same prompt (`submit_group`; choice i
samples with `SamplingParams.for_choice(i)`). It waits until n slots (and their pages) are free, its
prompt is prefilled once, and the prefix is inserted into each of the n slots (`Engine.fork` draws
each choice's first token from the prompt's last logits with its own seed); from then on every
choice is an ordinary request in its own slot. With the paged cache the choices share the pages
their prompt fills (`PageAllocator.reserve_choice`), so n choices hold the prompt once. Cancelling
one member cancels the group.

The waiting queue is bounded (`max_queue_size`); `submit` raises `QueueFull` beyond it. The loop runs
in a background thread (`start` / `stop`) or is driven by hand (`step`, `run_until_idle`) in tests.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax

from llm_serve.sampling import SamplingParams
from llm_serve.tokenizer import TextStream, Tokenizer


class QueueFull(RuntimeError):
    """The waiting queue is full; try again later (HTTP 429)."""


@dataclass
class Event:
    """What a request receives per generated token (and once more when it finishes)."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"


_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finished: bool = False
    generated: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float = 0.0
    stream: TextStream | None = None
    max_new: int = 0
    text: str = ""  # filled by generate_text
    finish_reason: str | None = None
    # sampling.prompt_logprobs only: per prompt token, log p(token | tokens before it) (None for the
    # first) and its most likely alternatives [(token id, logprob)] (None for the first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    cum_logprob: float = 0.0  # sum of the generated tokens' log-probs (ranks best_of candidates)
    index: int = 0  # the choice this request is, within its group (n > 1)
    group: list[Request] | None = None  # every choice of the request (set by submit_group)


class Scheduler:
    def __init__(self, engine, params, tokenizer: Tokenizer, *, max_queue=None, metrics=None):
        self.engine = engine
        self.params = params
        self.tokenizer = tokenizer
        self.max_queue = max_queue if max_queue is not None else engine.cfg.max_queue_size
        self.metrics = metrics
        self.state = engine.init_decode_state()
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * engine.max_concurrent_decodes
        # (slots of the group, PrefillJob, the request whose sampling the prefill used)
        self.prefilling: list[tuple[list[int], object, Request]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._warmup_ids: list[int] | None = None
        self._running = False
        self.error: BaseException | None = None
        self.ready = threading.Event()  # set once warmed up (`start`): /health answers 200 then

    # ------------------------------------------------------------------ client side (any thread)
    def submit(self, req: Request) -> Request:
        return self.submit_group([req])[0]

    def submit_group(self, reqs: list[Request]) -> list[Request]:
        """The n choices of one request (same prompt; choice i usually with
        `sampling.for_choice(i)`): admitted together, prefilled once. Raises ValueError (n larger
        than the slots, or a prompt that does not fit) or QueueFull."""
        if not reqs:
            raise ValueError("a group needs at least one request")
        first = reqs[0]
        if any(r.prompt_ids != first.prompt_ids for r in reqs):
            raise ValueError("the requests of a group must share their prompt")
        if len(reqs) > len(self.slots):
            raise ValueError(
                f"n={len(reqs)} choices need as many decode slots; this server has "
                f"{len(self.slots)} (max_decode_slots)."
            )
        n = len(first.prompt_ids)
        room = self.engine.max_len - n
        if n == 0 or room <= 0:
            raise ValueError(
                f"prompt has {n} tokens; the context holds {self.engine.max_len} "
                "(kv_cache_max_length), prompt included, and a prompt needs at least 1 token."
            )
        alloc = self.engine.allocator
        for i, req in enumerate(reqs):
            req.max_new = min(req.sampling.max_tokens, room)
            req.index, req.group = i, reqs
            req.stream = TextStream(self.tokenizer, req.sampling.stop)
        pages = _group_pages(alloc, reqs, indexed=False) if alloc is not None else 0
        if alloc is not None and pages > alloc.capacity:
            raise ValueError(
                f"prompt + max_tokens need {pages} KV pages but the pool holds {alloc.capacity} "
                "(kv_num_pages); lower max_tokens (or n) or raise kv_num_pages."
            )
        with self._cv:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (max_queue_size)")
            self.queue.append(first)
            self._cv.notify()
        return reqs

    def cancel(self, req: Request) -> None:
        """The client went away: free its slots and pages (every choice's) at the next step."""
        with self._cv:
            for r in req.group or [req]:
                r.cancelled = True
            self._cv.notify()

    def stats(self) -> dict:
        alloc = self.engine.allocator
        return {
            "queue_depth": len(self.queue),
            "active_slots": sum(r is not None for r in self.slots),
            "total_slots": len(self.slots),
            "free_pages": alloc.num_free if alloc else None,
            "total_pages": alloc.capacity if alloc else None,
        }

    # ------------------------------------------------------------------ loop
    def start(self, warmup_ids: list[int] | None = None) -> None:
        """Run the loop in a background thread; with `warmup_ids`, it first generates two tokens
        for that prompt (compiling the prefill and decode programs) before `ready` is set.
        Requests submitted meanwhile wait in the queue."""
        self._running = True
        self._warmup_ids = warmup_ids
        self._thread = threading.Thread(target=self._loop, name="llm-serve-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _warm_up(self, ids: list[int]) -> None:
        """Two greedy tokens for `ids`, ahead of any queued request and outside the metrics."""
        metrics, self.metrics = self.metrics, None
        try:
            req = Request(list(ids), SamplingParams(temperature=0, max_tokens=2), lambda ev: None)
            self.submit(req)
            with self._cv:
                self.queue.remove(req)
                self.queue.appendleft(req)
            while not req.finished:
                self.step()
        finally:
            self.metrics = metrics

    def _loop(self) -> None:
        try:
            if self._warmup_ids:
                self._warm_up(self._warmup_ids)
            self.ready.set()
            while self._running:
                with self._cv:
                    while self._running and not self._has_work():
                        self._cv.wait(timeout=1.0)
                if self._running:
                    self.step()
        except BaseException as err:  # pragma: no cover - surfaced through /health
            self.error = err
            for slot, req in enumerate(self.slots):
                if req is not None:
                    self._finish(slot, "abort")
            raise

    def _has_work(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.slots)

    def run_until_idle(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self._has_work():
                return
            self.step()
        raise RuntimeError(f"scheduler still busy after {max_steps} steps")

    def step(self) -> None:
        for slot, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self._finish(slot, "abort")
        self._admit()
        if self.prefilling:
            self._prefill()
        busy = {s for slots, _, _ in self.prefilling for s in slots}
        decoding = [s for s, r in enumerate(self.slots) if r is not None and s not in busy]
        if decoding:
            self.state, out = self.engine.generate(self.params, self.state)
            out = jax.device_get(out)
            for slot in decoding:
                self._deliver(slot, self.slots[slot], out, slot)
        self._update_gauges()

    def _prefill(self) -> None:
        """One chunk of the oldest prompt, or, when it fits in one chunk, that prompt together
        with every other waiting whole prompt of its cache bucket in one batched forward."""
        _, head, _ = self.prefilling[0]
        if self.engine.batchable(head):
            batch = [
                entry
                for entry in self.prefilling
                if self.engine.batchable(entry[1]) and entry[1].capacity == head.capacity
            ]
            prefixes = self.engine.prefill_batch(self.params, [job for _, job, _ in batch])
        else:
            batch, prefixes = self.prefilling[:1], [self.engine.prefill_chunk(self.params, head)]
        done = {id(entry) for entry, prefix in zip(batch, prefixes) if prefix is not None}
        self.prefilling = [entry for entry in self.prefilling if id(entry) not in done]
        for entry, prefix in zip(batch, prefixes):
            if prefix is None:
                continue
            if self.metrics:
                self.metrics.prompt_tokens.inc(prefix.length)
            slots, _, owner = entry
            for slot in slots:
                self._start_decoding(slot, prefix, owner)

    def _start_decoding(self, slot: int, prefix, owner: Request) -> None:
        """A finished prefill goes into `slot` (its own first token unless it is `owner`'s)."""
        req = self.slots[slot]
        if prefix.prompt_logprobs is not None:
            _store_prompt_scores(req, prefix)
        if req.max_new == 0:  # scoring only: no slot needed for decoding
            self._finish(slot, "length")
            return
        mine = prefix if req is owner else self.engine.fork(prefix, req.sampling)
        self.state = self.engine.insert(mine, self.state, slot)
        self._deliver(slot, req, jax.device_get(mine.first), 0)

    def _admit(self) -> None:
        with self._cv:
            free = [s for s, r in enumerate(self.slots) if r is None]
            alloc = self.engine.allocator
            while self.queue:
                lead = self.queue[0]
                group = lead.group or [lead]
                if any(r.cancelled for r in group):
                    for r in group:
                        self._reject(self.queue.popleft() if r is lead else r)
                    continue
                if len(free) < len(group):
                    break  # slots come back when running requests finish
                n = len(lead.prompt_ids)
                if alloc is not None and _group_pages(alloc, group) > alloc.num_free:
                    break  # pages come back when running requests finish
                taken = []
                for r in group:
                    slot = free.pop(0)
                    # the other choices share the first's prompt pages
                    first = taken[0] if taken else None
                    if not self.engine.reserve(slot, n + r.max_new, lead.prompt_ids, first):
                        raise RuntimeError(
                            "pages counted free could not be reserved"
                        )  # pragma: no cover
                    self.slots[slot] = r
                    taken.append(slot)
                self.queue.popleft()
                job = self.engine.start_prefill(
                    lead.prompt_ids, lead.sampling, lead.sampling.prompt_logprobs
                )
                if self.metrics and self.engine.prefix_cache is not None:
                    self.metrics.prefix_queries.inc(n)
                    self.metrics.prefix_hits.inc(job.reused)
                self.prefilling.append((taken, job, lead))

    def _reject(self, req: Request) -> None:
        if req.finished:
            return
        req.finished = True
        req.finish_reason = "abort"
        req.on_event(Event(text="", finish_reason="abort"))
        if self.metrics:
            self.metrics.requests.labels("abort").inc()

    # ------------------------------------------------------------------ per token
    def _deliver(self, slot: int, req: Request, out, row: int) -> None:
        token = int(out.tokens[row])
        now = time.perf_counter()
        if self.metrics:
            if req.generated:
                self.metrics.itl.observe(now - req.last_token_time)
            else:
                self.metrics.ttft.observe(now - req.arrival)
            self.metrics.generation_tokens.inc()
        req.last_token_time = now
        req.generated.append(token)
        req.cum_logprob += float(out.logprobs[row])
        sp = req.sampling
        lp = top = None
        if sp.logprobs is not None:
            lp = float(out.logprobs[row])
            top = [
                (int(i), float(v))
                for i, v in zip(out.top_ids[row][: sp.logprobs], out.top_logprobs[row])
            ]
        eos = self.tokenizer.eos_token_id
        if token in sp.stop_token_ids or (token == eos and not sp.ignore_eos):
            req.on_event(Event(req.stream.flush(), token, lp, top, None))
            self._finish(slot, "stop")
            return
        text = req.stream.push(token)
        if req.stream.stopped:
            req.on_event(Event(text, token, lp, top, None))
            self._finish(slot, "stop")
        elif len(req.generated) >= req.max_new:
            req.on_event(Event(text + req.stream.flush(), token, lp, top, None))
            self._finish(slot, "length")
        else:
            req.on_event(Event(text, token, lp, top, None))

    def _finish(self, slot: int, reason: str) -> None:
        req = self.slots[slot]
        self.slots[slot] = None
        self.prefilling = [
            ([s for s in slots if s != slot], job, owner)
            for slots, job, owner in self.prefilling
            if slots != [slot]
        ]
        self.state = self.engine.release(self.state, slot)
        if req is not None and not req.finished:
            req.finished = True
            req.finish_reason = reason
            req.on_event(Event(text="", finish_reason=reason))
            if self.metrics:
                self.metrics.requests.labels(reason).inc()

    def _update_gauges(self) -> None:
        if self.metrics:
            s = self.stats()
            self.metrics.queue_depth.set(s["queue_depth"])
            self.metrics.active_slots.set(s["active_slots"])
            if s["free_pages"] is not None:
                self.metrics.free_pages.set(s["free_pages"])


def _store_prompt_scores(req: Request, prefix) -> None:
    lps = prefix.prompt_logprobs.tolist()
    ids, tops = prefix.prompt_top_ids.tolist(), prefix.prompt_top_logprobs.tolist()
    req.prompt_logprobs = [None, *lps[1:]]
    req.prompt_top_logprobs = [None] + [list(zip(i, v)) for i, v in zip(ids[1:], tops[1:])]


def generate_text(scheduler: Scheduler, prompt_ids, sampling: SamplingParams) -> Request:
    """Run one request to completion on a hand-driven scheduler (tests, the CLI); returns it."""
    events: list[Event] = []
    req = scheduler.submit(Request(list(prompt_ids), sampling, events.append))
    scheduler.run_until_idle()
    req.text = "".join(e.text for e in events)
    return req


__all__ = ["Event", "QueueFull", "Request", "Scheduler", "generate_text"]


def _group_pages(alloc, group: list, indexed: bool = True) -> int:
    """Pages a group's reservation takes: the first choice's (less those already in the prefix
    index, with `indexed`), then each other choice's beyond the prompt's full pages."""
    prompt = group[0].prompt_ids
    n = len(prompt)
    first = group[0]
    pages = (
        alloc.new_pages_for(n + first.max_new, prompt)
        if indexed
        else alloc.pages_for(n + first.max_new)
    )
    return pages + sum(alloc.choice_pages_for(n + r.max_new, n) for r in group[1:])
