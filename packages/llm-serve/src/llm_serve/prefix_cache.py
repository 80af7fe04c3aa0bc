"""Prefix caching: the prefill KV of recent prompts, reused by prompts that start the same way.

A shared system prompt or few-shot preamble is prefilled once: a new prompt whose first m tokens
(m a multiple of `kv_page_size`, and at least one token left to prefill, which gives the logits of
the last position) equal an entry's starts its chunked prefill at position m from a copy of that
entry's cache. Entries are whole finished prompts (batch-of-one prefill caches), kept least
recently used first up to `prefix_cache_entries`; each costs its prompt's KV (capacity x layers x
K/V) in device memory. Prompts that ask for prompt log-probs (echo) are prefilled whole, since
every position must be scored. With the paged cache, the decode slots also share the pages of a
common prompt prefix (`kv_pages.PageAllocator`, `share_prefixes`); the contiguous cache gives each
slot its own copy (`insert` copies the prompt's KV into its row).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Entry:
    tokens: np.ndarray  # the cached prompt
    cache: Any  # its batch-of-one contiguous prefill cache
    capacity: int


class PrefixCache:
    def __init__(self, max_entries: int, block: int):
        self.max_entries, self.block = max_entries, block
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.query_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, served from the cache

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: np.ndarray) -> tuple[Entry | None, int]:
        """(entry, m): the entry sharing the longest reusable prefix and its length m (a multiple
        of the block, < len(tokens)); (None, 0) when no entry shares a whole block."""
        self.query_tokens += len(tokens)
        limit = (len(tokens) - 1) // self.block * self.block
        best, best_m = None, 0
        for entry in self._entries.values():
            n = min(limit, len(entry.tokens))
            if n < self.block:
                continue
            differ = np.flatnonzero(entry.tokens[:n] != tokens[:n])
            common = int(differ[0]) if len(differ) else n
            m = common // self.block * self.block
            if m > best_m:
                best, best_m = entry, m
        if best is not None:
            self._entries.move_to_end(best.tokens.tobytes())
            self.hit_tokens += best_m
        return best, best_m

    def store(self, tokens: np.ndarray, cache, capacity: int) -> None:
        if self.max_entries <= 0 or len(tokens) < self.block:
            return
        key = tokens.tobytes()
        self._entries.pop(key, None)
        self._entries[key] = Entry(np.array(tokens, np.int32), cache, capacity)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
