"""The engine: prefill a prompt, insert it into a decode slot, generate one token for every slot.

The protocol (as in JetStream) keeps the engine free of any scheduling policy:

    engine, params = Engine.from_model(cfg, model)            # or Engine(cfg, graphdef, params)
    state = engine.init_decode_state()
    prefix = engine.prefill(params, prompt_ids, sampling)     # KV of the prompt + its first token
    state = engine.insert(prefix, state, slot)
    state, out = engine.generate(params, state)               # one token for every slot
    state = engine.release(state, slot)                       # slot (and its pages) free again

`engine.fork(prefix, sampling)` gives the same prompt KV with a first token drawn under other settings
(another seed) from the prompt's last logits: `n` > 1 choices prefill once and insert the forks into
n slots (insert copies the prefix into each slot's row or pages).

Every step is the model's own `forward` on a cache from the model's `init_cache`, jitted over
`nnx.split` state. `from_model` serves llm-core's decode view (`llm_core.unstack_layers`: the same
parameters, one array per layer group) unless `decode_view=False`. The engine never looks inside a
cache: it creates caches through the model and changes them with `llm_core.map_layer_caches` and the
layer caches' serving methods (`resize`, `insert`, `write_prefix`, `with_table`).

Prompts are processed in chunks of at most `max_prefill_length` tokens (`start_prefill` +
`prefill_chunk` let a scheduler interleave the chunks of a long prompt with decode steps) into a
contiguous batch-of-one cache. Chunk and prefix lengths are rounded up to power-of-two buckets, so a
new prompt length reuses a compiled program: at most log2(max_prefill_length) x
log2(kv_cache_max_length) prefill programs exist (twice that once prompt log-probs are asked for).

`prefill(..., prompt_logprobs=k)` also scores the prompt (as for `echo` in the OpenAI completions
API): `Prefix.prompt_logprobs[i]` is log p(token i | tokens before it), the float32 log-softmax of
the logits at position i-1 (NaN for i = 0), with the k most likely tokens at each position in
`prompt_top_ids` / `prompt_top_logprobs`. It is computed inside the jitted prefill, chunk by chunk
(the last position's log-softmax is carried to the next chunk), only when asked: a static flag, so
other prompts run the program without it.

The decode slots' cache is contiguous (one row per slot; `insert` copies the prefix into its row) or
paged (a pool of pages shared by the slots, host bookkeeping in `kv_pages.PageAllocator`; `insert`
writes the prefix into the slot's pages, and a decode step's attention reads the pages in place
through `llm_kernels.paged_attention`). Either way a decode step works on a cache *length* that
follows the longest active request, in power-of-two buckets of at least DECODE_MIN_BUCKET (the
contiguous cache is grown or cut between steps; the paged step sees only the leading columns of the
page table), so short requests do not pay for `kv_cache_max_length` positions per step; on the CPU
(float32 or bfloat16 caches) the attention kernel then reads each row only up to its own position.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_core import (
    ConfigError,
    map_layer_caches,
    pack_linears,
    packs_on_this_backend,
    unstack_layers,
)
from llm_serve.engine_types import (  # noqa: F401  (next_bucket, MIN_BUCKET: engine API)
    DECODE_MIN_BUCKET,
    MIN_BUCKET,
    DecodeState,
    PrefillJob,
    Prefix,
    next_bucket,
)
from llm_serve.kv_pages import PageAllocator
from llm_serve.prefix_cache import PrefixCache
from llm_serve.sampling import TOP_LOGPROBS_MAX, Sampled, SamplingParams, SlotSampling, sample


class Engine:
    def __init__(
        self,
        cfg,
        graphdef,
        params,
        *,
        kv_cache_kind: str | None = None,
        slots: int | None = None,
        max_len: int | None = None,
        num_pages: int | None = None,
    ):
        """`graphdef, params = nnx.split(model)`; only the shapes of `params` are kept (to build
        caches through the model); the arrays are passed to every call."""
        self.cfg = cfg
        self.graphdef = graphdef
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        self._cache_maker = nnx.merge(graphdef, shapes)  # init_cache only: holds no weights
        self.kind = kv_cache_kind or cfg.kv_cache_kind
        self.slots = slots or cfg.max_decode_slots
        self.max_len = max_len or cfg.kv_cache_max_length
        self.page_size = cfg.kv_page_size
        self.max_prefill = cfg.max_prefill_length
        self.cache_dtype = jnp.dtype(cfg.dtype)
        if self.kind not in ("contiguous", "paged"):
            raise ConfigError(f"kv_cache_kind must be 'contiguous' or 'paged', got {self.kind!r}.")
        if self.kind == "paged" and self.max_len % self.page_size:
            raise ConfigError(
                f"kv_cache_max_length ({self.max_len}) must be a multiple of kv_page_size "
                f"({self.page_size}) for the paged cache."
            )
        if cfg.prefix_cache_entries < 0:
            raise ConfigError(
                f"prefix_cache_entries must be >= 0 (0 = off), got {cfg.prefix_cache_entries}."
            )
        self.prefix_cache = (
            PrefixCache(cfg.prefix_cache_entries, self.page_size)
            if cfg.prefix_cache_entries
            else None
        )
        self.allocator = None
        self.num_pages = (
            num_pages or cfg.kv_num_pages or self.slots * self.max_len // self.page_size + 1
        )
        if self.kind == "paged":
            self.allocator = self._new_allocator()
        self._host_pos = np.zeros(self.slots, np.int64)
        self._host_active = np.zeros(self.slots, bool)
        self.decode_len = self._decode_bucket(1)  # cache length a decode step works on
        self._prefill_fn = jax.jit(
            self._prefill_impl, donate_argnums=(1,), static_argnames=("score",)
        )
        # the batched cache is not donated: its rows come back as new arrays of another shape
        self._prefill_batch_fn = jax.jit(self._prefill_batch_impl, static_argnums=(6,))
        self._insert_fn = jax.jit(self._insert_impl, donate_argnums=(0,))
        self._generate_fn = jax.jit(self._generate_impl, donate_argnums=(1,), static_argnums=(2,))
        self._resize_fn = jax.jit(_resize, static_argnums=(1,))  # new shape: nothing to donate
        self._copy_fn = jax.jit(_copied, static_argnums=(1,))

    @classmethod
    def from_model(cls, cfg, model: nnx.Module, *, decode_view: bool = True, **kwargs):
        """(engine, params). decode_view=True (default) serves `llm_core.unstack_layers(model)`
        (per-group weight arrays: copies, so drop `model` afterwards to free the stacked ones),
        with its float32 and bfloat16 Linear weights packed for `llm_kernels.packed_matmul` on the
        CPU (`packed_matmul`, default on); False serves the model as it is."""
        if decode_view:
            model = unstack_layers(model)
            if packs_on_this_backend(cfg):
                pack_linears(model)  # the view's arrays are copies: packing leaves `model` whole
        graphdef, params = nnx.split(model)
        return cls(cfg, graphdef, params, **kwargs), params

    def _forward(self, params, ids, positions, cache):
        logits, cache, _ = nnx.merge(self.graphdef, params).forward(ids, positions, None, cache)
        return logits, cache

    @property
    def max_concurrent_decodes(self) -> int:
        return self.slots

    def _decode_bucket(self, need: int) -> int:
        return max(
            next_bucket(need, self.max_len, self.page_size), min(DECODE_MIN_BUCKET, self.max_len)
        )

    def _fit(self, state: DecodeState, need: int) -> DecodeState:
        """Make the decode length the bucket of `need` positions (contiguous: grow / cut the cache)."""
        length = self._decode_bucket(need)
        if length != self.decode_len and self.kind == "contiguous":
            state = state.replace(cache=self._resize_fn(state.cache, length))
        self.decode_len = length
        return state

    def _new_allocator(self) -> PageAllocator:
        per_slot = self.max_len // self.page_size
        share = self.prefix_cache is not None  # prefix caching also shares the prompt pages
        return PageAllocator(self.num_pages, self.page_size, self.slots, per_slot, share)

    def _with_host_table(self, state: DecodeState) -> DecodeState:
        return state.replace(table=jnp.asarray(self.allocator.table))

    # ------------------------------------------------------------------ decode state
    def init_decode_state(self) -> DecodeState:
        """A fresh decode state: every slot free (and, paged, every page back in the pool)."""
        self.decode_len = self._decode_bucket(1)
        table = None
        if self.kind == "paged":
            self.allocator = self._new_allocator()
            cache = self._cache_maker.init_cache(
                self.slots, self.max_len, self.cache_dtype, kind="paged",
                num_pages=self.num_pages, page_size=self.page_size,
            )  # fmt: skip
            table = jnp.asarray(self.allocator.table)
        else:
            cache = self._cache_maker.init_cache(self.slots, self.decode_len, self.cache_dtype)
        self._host_pos[:] = 0
        self._host_active[:] = False
        return DecodeState(
            cache=cache,
            table=table,
            tokens=jnp.zeros((self.slots,), jnp.int32),
            positions=jnp.zeros((self.slots,), jnp.int32),
            active=jnp.zeros((self.slots,), bool),
            sampling=SlotSampling.init(self.slots),
            counts=jnp.zeros((self.slots, self.cfg.vocab_size), jnp.int32),
        )

    # ------------------------------------------------------------------ prefill
    def start_prefill(
        self, tokens, sampling: SamplingParams | None = None, prompt_logprobs: int | None = None
    ) -> PrefillJob:
        """`prompt_logprobs`: None, or k >= 0 to score the prompt (see Prefix)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if not 0 < len(tokens) < self.max_len:
            raise ValueError(
                f"prompt has {len(tokens)} tokens; it must have 1 to {self.max_len - 1} "
                "(kv_cache_max_length - 1)."
            )
        sampling = sampling or SamplingParams(temperature=0.0)
        length = next_bucket(len(tokens), self.max_len, self.page_size)
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= TOP_LOGPROBS_MAX:
            raise ValueError(f"prompt_logprobs must be None or in [0, {TOP_LOGPROBS_MAX}].")
        job = PrefillJob(
            tokens=tokens, sampling=SlotSampling.of(sampling), cache=None, capacity=length
        )  # the cache is made by the first chunk (a batched prefill makes its own)
        if prompt_logprobs is not None:  # every position is scored: prefilled whole
            job.prompt_logprobs = prompt_logprobs
            job.prev = jnp.zeros((self.cfg.vocab_size,), jnp.float32)
        elif self.prefix_cache is not None:
            entry, reused = self.prefix_cache.lookup(tokens)
            if entry is not None:  # start after the shared prefix, from a copy of its KV
                job.cache = self._copy_fn(entry.cache, length)  # prefill donates its cache
                job.done = job.reused = reused
        return job

    def prefill_chunk(self, params, job: PrefillJob) -> Prefix | None:
        """Run the next chunk of `job`; returns the Prefix after the last chunk, else None."""
        n = len(job.tokens)
        chunk = job.tokens[job.done : job.done + self.max_prefill]
        c = len(chunk)
        width = next_bucket(c, self.max_prefill)
        ids = np.zeros((1, width), np.int32)
        ids[0, :c] = chunk
        pos = np.full((1, width), job.capacity, np.int32)  # padding: dropped by the cache
        pos[0, :c] = np.arange(job.done, job.done + c)
        score = job.prompt_logprobs is not None
        if job.cache is None:
            job.cache = self._cache_maker.init_cache(1, job.capacity, self.cache_dtype)
        job.cache, job.first, job.logits, scores = self._prefill_fn(
            params, job.cache, jnp.asarray(ids), jnp.asarray(pos), c - 1, job.sampling, job.prev,
            score=score,
        )  # fmt: skip
        if score:
            lps, top_ids, top_lps, job.prev = scores
            k = job.prompt_logprobs
            lps, top_ids, top_lps = jax.device_get((lps, top_ids, top_lps))
            job.scores.append((lps[:c], top_ids[:c, :k], top_lps[:c, :k]))  # padding dropped
        job.done += c
        if job.done < n:
            return None
        prefix = Prefix(
            cache=job.cache, capacity=job.capacity, length=n, first=job.first, sampling=job.sampling,
            logits=job.logits, tokens=job.tokens,
        )  # fmt: skip
        if self.prefix_cache is not None:
            self.prefix_cache.store(job.tokens, job.cache, job.capacity)
        if score:
            lps, top_ids, top_lps = (np.concatenate(parts) for parts in zip(*job.scores))
            lps[0] = np.nan  # the first token has no context
            top_ids[0] = 0
            top_lps[0] = np.nan
            prefix.prompt_logprobs = lps.astype(np.float32)
            prefix.prompt_top_ids = top_ids.astype(np.int32)
            prefix.prompt_top_logprobs = top_lps.astype(np.float32)
            job.scores, job.prev = [], None
        return prefix

    def prefill(
        self, params, tokens, sampling: SamplingParams | None = None, prompt_logprobs=None
    ) -> Prefix:
        job = self.start_prefill(tokens, sampling, prompt_logprobs)
        while (prefix := self.prefill_chunk(params, job)) is None:
            pass
        return prefix

    def batchable(self, job: PrefillJob) -> bool:
        """Whether `job` can join a batched prefill: a whole prompt in one chunk, from its start
        (no prefix-cache hit), not scored."""
        return job.done == 0 and job.prompt_logprobs is None and len(job.tokens) <= self.max_prefill

    def prefill_batch(self, params, jobs: list[PrefillJob]) -> list[Prefix]:
        """Prefill several prompts in one forward (each `batchable`, all of one `capacity`):
        the weights are read once for all of them, where `prefill_chunk` reads them per prompt.
        The row count is padded to a power of two (padding rows write nothing), so at most
        log2(max_decode_slots) + 1 programs exist per prompt bucket."""
        if not jobs:
            return []
        cap = jobs[0].capacity
        for i, job in enumerate(jobs):
            if not self.batchable(job) or job.capacity != cap:
                raise ValueError(
                    f"prefill_batch: job {i} is not batchable with job 0 (a whole prompt of at most "
                    f"max_prefill_length={self.max_prefill} tokens, not started, not scored, "
                    f"capacity {job.capacity} vs {cap}); use prefill_chunk"
                )
        n = len(jobs)
        rows = 1 << (n - 1).bit_length()
        width = next_bucket(max(len(j.tokens) for j in jobs), self.max_prefill)
        ids = np.zeros((rows, width), np.int32)
        pos = np.full((rows, width), cap, np.int32)  # padding: dropped by the cache
        last = np.zeros((rows,), np.int32)
        for i, job in enumerate(jobs):
            c = len(job.tokens)
            ids[i, :c], pos[i, :c], last[i] = job.tokens, np.arange(c), c - 1
        samplings = [j.sampling for j in jobs] + [jobs[0].sampling] * (rows - n)
        sampling = jax.tree.map(lambda *xs: jnp.concatenate(xs), *samplings)
        cache = self._cache_maker.init_cache(rows, cap, self.cache_dtype)
        caches, firsts, logits = self._prefill_batch_fn(
            params, cache, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(last), sampling, n
        )
        prefixes = []
        for job, cache, first, row_logits in zip(jobs, caches, firsts, logits):
            job.cache, job.first, job.logits, job.done = cache, first, row_logits, len(job.tokens)
            prefix = Prefix(
                cache,
                cap,
                len(job.tokens),
                first,
                job.sampling,
                logits=row_logits,
                tokens=job.tokens,
            )
            prefixes.append(prefix)
            if self.prefix_cache is not None:
                self.prefix_cache.store(job.tokens, cache, cap)
        return prefixes

    def _prefill_batch_impl(self, params, cache, ids, pos, last, sampling, n: int):
        model = nnx.merge(self.graphdef, params)
        x, cache, _ = model.hidden(ids, pos, None, cache)
        last_x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [rows, 1, E]
        last_logits = model.logits(last_x)[:, 0]
        first = _first_token(last_logits, sampling)
        caches = tuple(map_layer_caches(lambda c, i=i: c.row(i), cache) for i in range(n))
        firsts = tuple(jax.tree.map(lambda a, i=i: a[i : i + 1], first) for i in range(n))
        return caches, firsts, tuple(last_logits[i : i + 1] for i in range(n))

    def _prefill_impl(self, params, cache, ids, pos, last, sampling, prev, score: bool):
        model = nnx.merge(self.graphdef, params)
        if not score:  # the head runs on the last position only (the vocab matmul is ~30% of a
            # small model's prefill FLOPs); scoring needs every position's logits
            x, cache, _ = model.hidden(ids, pos, None, cache)
            last_x = jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1)
            last_logits = model.logits(last_x)[:, 0]
            return cache, _first_token(last_logits, sampling), last_logits, None
        logits, cache, _ = model.forward(ids, pos, None, cache)
        last_logits = jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)
        first = _first_token(last_logits, sampling)
        # token j of the chunk is scored by the log-softmax at position j - 1 (j = 0: the last
        # position of the previous chunk, `prev`); rows past the chunk are padding
        lsm = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)  # [W, V]
        before = jnp.concatenate([prev[None].astype(jnp.float32), lsm[:-1]], axis=0)
        lps = jnp.take_along_axis(before, ids[0][:, None], axis=-1)[:, 0]
        top_lps, top_ids = jax.lax.top_k(before, min(TOP_LOGPROBS_MAX, before.shape[-1]))
        new_prev = jax.lax.dynamic_index_in_dim(lsm, last, axis=0, keepdims=False)
        return cache, first, last_logits, (lps, top_ids.astype(jnp.int32), top_lps, new_prev)

    def fork(self, prefix: Prefix, sampling: SamplingParams) -> Prefix:
        """The same prompt KV with its first token drawn anew under `sampling` (e.g. another seed):
        for `n` > 1 choices of one prompt, prefilled once and inserted into several slots. The
        cache is shared, not copied: `insert` copies it into each slot's row or pages."""
        if prefix.logits is None:
            raise ValueError("this Prefix has no last-position logits to sample from")
        slot_sampling = SlotSampling.of(sampling)
        first = _sample_first(prefix.logits, slot_sampling)
        return dataclasses.replace(prefix, first=first, sampling=slot_sampling)

    # ------------------------------------------------------------------ insert / release
    def reserve(
        self, slot: int, num_tokens: int, prompt=None, choice_of: int | None = None
    ) -> bool:
        """Paged cache: reserve pages for `num_tokens` tokens of `slot`; False if too few are free.
        With prefix caching, `prompt`'s leading full pages already in the pool are shared; with
        `choice_of`, `slot` shares the pages the prompt fills in that slot (another choice)."""
        alloc = self.allocator
        return alloc is None or alloc.try_reserve(slot, num_tokens, prompt, choice_of)

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range [0, {self.slots})")
        pages = None
        if self.allocator is not None:
            self.allocator.reserve(slot, prefix.length + 1, prefix.tokens)
            n = prefix.capacity // self.page_size
            pages = np.zeros(n, np.int32)  # pages past the slot's own: the null page
            owned = self.allocator.owned(slot)[:n]
            pages[: len(owned)] = owned
            pages[: self.allocator.shared(slot)] = 0  # shared pages hold the prompt: not rewritten
            state = self._with_host_table(state)
            pages = jnp.asarray(pages)
        need = max([prefix.length + 1, *(self._host_pos[self._host_active] + 1)])
        state = self._fit(state, max(need, prefix.capacity))
        state = self._insert_fn(state, prefix.cache, prefix.first, prefix.length, slot, pages)
        if self.allocator is not None and prefix.tokens is not None:
            self.allocator.register(slot, prefix.tokens)
        state = state.replace(sampling=_set_slot(state.sampling, prefix.sampling, slot))
        self._host_pos[slot] = prefix.length
        self._host_active[slot] = True
        return state

    def _insert_impl(self, state, cache, first, length, slot, pages):
        if pages is None:
            new_cache = map_layer_caches(lambda c, row: c.insert(row, slot), state.cache, cache)
        else:
            new_cache = map_layer_caches(
                lambda c, row: c.write_prefix(row, pages), state.cache, cache
            )
        token = first.tokens[0]
        counts = jnp.zeros((state.counts.shape[1],), jnp.int32).at[token].add(1)
        return state.replace(
            cache=new_cache,
            tokens=state.tokens.at[slot].set(token),
            positions=state.positions.at[slot].set(length),
            active=state.active.at[slot].set(True),
            counts=state.counts.at[slot].set(counts),
        )

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Deactivate `slot` and return its pages at once."""
        if self.allocator is not None:
            self.allocator.release(slot)
            state = self._with_host_table(state)
        self._host_active[slot] = False
        return state.replace(active=_deactivate(state.active, slot))

    # ------------------------------------------------------------------ generate
    def generate(self, params, state: DecodeState) -> tuple[DecodeState, Sampled]:
        """One decode step for every slot; rows of inactive slots in the result are meaningless."""
        if self.allocator is not None:
            grew = False
            for slot in np.flatnonzero(self._host_active):
                need = int(self._host_pos[slot]) + 1
                if self.allocator.pages_for(need) > len(self.allocator.owned(slot)):
                    self.allocator.reserve(slot, need)
                    grew = True
            if grew:
                state = self._with_host_table(state)
        if self._host_active.any():
            state = self._fit(state, int(self._host_pos[self._host_active].max()) + 1)
        state, out = self._generate_fn(params, state, self.decode_len)
        self._host_pos[self._host_active] += 1
        return state, out

    def _generate_impl(self, params, state: DecodeState, length: int):
        pos = jnp.where(state.active, state.positions, self.max_len)[:, None]  # inactive: dropped
        ids = state.tokens[:, None]
        cache = state.cache
        if state.table is not None:  # the kernel reads only the pages of the first `length` tokens
            table = state.table[:, : length // self.page_size]
            cache = map_layer_caches(lambda c: c.with_table(table), cache)
        logits, cache = self._forward(params, ids, pos, cache)
        if state.table is not None:  # back to the full table: the same cache shapes every step
            cache = map_layer_caches(lambda c: c.with_table(state.table), cache)
        out = sample(logits[:, 0], state.sampling, state.counts)
        act = state.active
        rows = jnp.arange(self.slots)
        new = state.replace(
            cache=cache,
            tokens=jnp.where(act, out.tokens, state.tokens),
            positions=state.positions + act.astype(jnp.int32),
            counts=state.counts.at[rows, out.tokens].add(act.astype(jnp.int32)),
            sampling=state.sampling.replace(step=state.sampling.step + act.astype(jnp.int32)),
        )
        return new, out


def _resize(cache, length: int):
    """Cut or zero-pad every layer cache of a contiguous model cache to `length` positions."""
    return map_layer_caches(lambda c: c.resize(length), cache)


def _copied(cache, length: int):
    """A copy of a contiguous model cache at `length` positions (never the input's buffers)."""
    return _resize(jax.tree.map(jnp.copy, cache), length)


def _first_token(logits: jax.Array, sampling: SlotSampling) -> Sampled:
    """A prompt's first generated token (no tokens generated yet: no penalty counts)."""
    return sample(logits, sampling, jnp.zeros(logits.shape, jnp.int32))


_sample_first = jax.jit(_first_token)


@partial(jax.jit, donate_argnums=(0,))
def _deactivate(active: jax.Array, slot: int) -> jax.Array:
    return active.at[slot].set(False)


@partial(jax.jit, donate_argnums=(0,))
def _set_slot(all_slots: SlotSampling, one: SlotSampling, slot: int) -> SlotSampling:
    """Copy a batch-of-one SlotSampling into row `slot` (step 1: the first token is sampled)."""
    one = one.replace(step=one.step + 1)
    return jax.tree.map(lambda a, b: a.at[slot].set(b[0]), all_slots, one)
