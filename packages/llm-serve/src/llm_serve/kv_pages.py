"""Host-side bookkeeping of a paged KV cache: a free list of fixed-size pages and a page table.

The device holds one pool of pages per layer, `k, v [num_layers, num_pages, page_size, kv_heads,
head_dim]`, and a page table `[slots, pages_per_slot]` of page ids. Page 0 is never handed out: empty
page-table entries point at it, so reads of them are masked by position and writes to them are
harmless. A slot's pages are reserved when its request is admitted (prompt + max_tokens, so a running
request never runs out) and returned the moment it finishes or its client goes away.
"""

from __future__ import annotations

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free pages for a request; it waits in the queue until pages come back."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, slots: int, pages_per_slot: int):
        if num_pages < 2:
            raise ValueError(f"kv_num_pages must be >= 2 (page 0 is reserved), got {num_pages}.")
        self.num_pages = num_pages
        self.page_size = page_size
        self.pages_per_slot = pages_per_slot
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() gives 1, 2, ...
        self.table = np.full((slots, pages_per_slot), NULL_PAGE, np.int32)
        self._owned: list[list[int]] = [[] for _ in range(slots)]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_reserve(self, slot: int, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(self._owned[slot]) <= self.num_free

    def reserve(self, slot: int, num_tokens: int) -> list[int]:
        """Make `slot` own pages for tokens [0, num_tokens); returns its pages in order."""
        need = self.pages_for(num_tokens)
        if need > self.pages_per_slot:
            raise OutOfPages(
                f"{num_tokens} tokens need {need} pages, more than a slot holds "
                f"({self.pages_per_slot}); raise kv_cache_max_length."
            )
        owned = self._owned[slot]
        extra = need - len(owned)
        if extra > self.num_free:
            raise OutOfPages(f"need {extra} more pages, {self.num_free} free")
        for _ in range(max(extra, 0)):
            page = self._free.pop()
            self.table[slot, len(owned)] = page
            owned.append(page)
        return list(owned)

    def release(self, slot: int) -> int:
        """Return every page of `slot` to the free list; returns how many."""
        owned = self._owned[slot]
        n = len(owned)
        self._free.extend(reversed(owned))
        self._owned[slot] = []
        self.table[slot] = NULL_PAGE
        return n

    def owned(self, slot: int) -> list[int]:
        return list(self._owned[slot])
