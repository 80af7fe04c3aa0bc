"""The engine's data: decode state, prefill jobs and prefixes, and the length buckets that bound how
many programs the engine compiles (see `llm_serve.engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import struct

from llm_serve.sampling import Sampled, SlotSampling

MIN_BUCKET = 16
DECODE_MIN_BUCKET = 64


def next_bucket(n: int, limit: int, multiple: int = 1) -> int:
    """Smallest power of two >= max(n, MIN_BUCKET), rounded up to `multiple`, capped at `limit`."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    b = -(-b // multiple) * multiple
    return min(b, limit)


@struct.dataclass
class DecodeState:
    cache: Any  # the model's cache for every slot (contiguous or paged)
    table: jax.Array | None  # paged: [slots, pages_per_slot] int32 page table; contiguous: None
    tokens: jax.Array  # [slots] int32: the last token of each slot (fed to the next step)
    positions: jax.Array  # [slots] int32: the position of that token
    active: jax.Array  # [slots] bool
    sampling: SlotSampling
    counts: jax.Array  # [slots, vocab] int32: tokens generated so far (for the penalties)


@dataclass
class PrefillJob:
    """A prompt being prefilled chunk by chunk into a batch-of-one cache of `capacity` positions."""

    tokens: np.ndarray
    sampling: SlotSampling
    cache: Any  # None until the first chunk (or a copy of a prefix-cache entry)
    capacity: int
    done: int = 0
    first: Sampled | None = None
    logits: jax.Array | None = None  # [1, V] logits at the last prompt position (after a chunk)
    prompt_logprobs: int | None = None  # None: not asked; k: also the k most likely tokens
    prev: jax.Array | None = None  # [V] log-softmax at the last position of the previous chunk
    scores: list = field(default_factory=list)  # per chunk: (logprobs [c], top_ids, top_lps)
    reused: int = 0  # leading tokens whose KV came from the prefix cache


@dataclass
class Prefix:
    """The KV of a prompt (a batch-of-one model cache of `capacity` >= length positions) and its
    first sampled token."""

    cache: Any
    capacity: int
    length: int
    first: Sampled
    sampling: SlotSampling
    meta: dict = field(default_factory=dict)
    logits: jax.Array | None = None  # [1, V] logits at the last prompt position (for `fork`)
    tokens: np.ndarray | None = None  # the prompt (a paged cache shares its full pages by it)
    # prefill(..., prompt_logprobs=k) only (host arrays): log p(token i | tokens < i), NaN at i = 0,
    # and the k most likely tokens at each position (row 0: zeros)
    prompt_logprobs: np.ndarray | None = None  # [length] float32
    prompt_top_ids: np.ndarray | None = None  # [length, k] int32
    prompt_top_logprobs: np.ndarray | None = None  # [length, k] float32
