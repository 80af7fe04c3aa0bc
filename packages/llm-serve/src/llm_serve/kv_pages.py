"""Host-side bookkeeping of a paged KV cache: a free list of fixed-size pages and a page table.

The device holds one pool of pages per layer, `k, v [num_layers, num_pages, page_size, kv_heads,
head_dim]`, and a page table `[slots, pages_per_slot]` of page ids. Page 0 is never handed out: empty
page-table entries point at it, so reads of them are masked by position and writes to them are
harmless. A slot's pages are reserved when its request is admitted (prompt + max_tokens, so a running
request never runs out) and returned the moment it finishes or its client goes away.

With `share_prefixes` (the engine turns it on for a paged cache with `prefix_cache_entries` > 0),
full pages of prompts are shared between slots, as in vLLM's prefix caching. A page whose positions
all lie inside a prompt is never written again once the prompt is stored (decoding writes from
the prompt's end on), so after `register` it is indexed by a hash of every token up to its end.
A later prompt starting with the same tokens `reserve`s those pages by reference (a count per
page) instead of taking new ones: the first page where the prompts differ, and every page after
it, is the slot's own, written by the new prompt's prefill (the copy happens at that divergent
page; shared pages are never written). A page whose last user leaves stays indexed and is reused
from the index until the free list runs dry; then the least recently released is taken back.

The `n` choices of one request share their prompt's full pages the same way, whatever
`share_prefixes` says: `reserve_choice` gives a choice the pages of its group's first slot that the
prompt fills, by reference, and pages of its own from the prompt's last partial page on.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free pages for a request; it waits in the queue until pages come back."""


class PageAllocator:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        slots: int,
        pages_per_slot: int,
        share_prefixes: bool = False,
    ):
        if num_pages < 2:
            raise ValueError(f"kv_num_pages must be >= 2 (page 0 is reserved), got {num_pages}.")
        self.num_pages = num_pages
        self.page_size = page_size
        self.pages_per_slot = pages_per_slot
        self.share_prefixes = share_prefixes
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() gives 1, 2, ...
        self.table = np.full((slots, pages_per_slot), NULL_PAGE, np.int32)
        self._owned: list[list[int]] = [[] for _ in range(slots)]
        self._shared: list[int] = [0] * slots  # leading pages of each slot taken by reference
        self._refs = np.zeros(num_pages, np.int32)
        self._index: dict[bytes, int] = {}  # hash of the tokens through a full page -> page
        self._key_of: dict[int, bytes] = {}  # indexed page -> its hash
        self._idle: OrderedDict[int, None] = OrderedDict()  # indexed pages no slot uses (LRU first)
        self.shared_hits = 0  # pages taken by reference instead of new ones

    @property
    def num_free(self) -> int:
        """Pages a reservation can take: free ones and indexed ones no slot uses."""
        return len(self._free) + len(self._idle)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _page_keys(self, prompt) -> list[bytes]:
        """A chained hash per full page of `prompt` (each covers every token up to its page's end)."""
        tokens = np.asarray(prompt, np.int32)
        keys, h = [], b""
        for start in range(0, len(tokens) // self.page_size * self.page_size, self.page_size):
            h = hashlib.blake2b(h + tokens[start : start + self.page_size].tobytes()).digest()
            keys.append(h)
        return keys

    def _matching(self, prompt) -> list[int]:
        """The indexed pages holding `prompt`'s leading full pages (none without sharing)."""
        if not self.share_prefixes or prompt is None:
            return []
        pages = []
        for key in self._page_keys(prompt):
            page = self._index.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def _plan(self, num_tokens: int, prompt) -> tuple[list[int], int]:
        """For a slot that owns nothing: (the indexed pages it would share, how many of
        `num_free` it would take: new pages plus shared ones that are idle now)."""
        need = self.pages_for(num_tokens)
        matched = self._matching(prompt)[:need]
        return matched, need - len(matched) + sum(page in self._idle for page in matched)

    def new_pages_for(self, num_tokens: int, prompt=None) -> int:
        """How many of `num_free` a reservation of a slot that owns nothing would take."""
        return self._plan(num_tokens, prompt)[1]

    def can_reserve(self, slot: int, num_tokens: int, prompt=None) -> bool:
        if not self._owned[slot]:
            return self.new_pages_for(num_tokens, prompt) <= self.num_free
        return self.pages_for(num_tokens) - len(self._owned[slot]) <= self.num_free

    def reserve(self, slot: int, num_tokens: int, prompt=None) -> list[int]:
        """Make `slot` own pages for tokens [0, num_tokens); returns its pages in order. A slot
        that owns nothing yet first takes the indexed pages of `prompt`'s leading full pages."""
        need = self.pages_for(num_tokens)
        if need > self.pages_per_slot:
            raise OutOfPages(
                f"{num_tokens} tokens need {need} pages, more than a slot holds "
                f"({self.pages_per_slot}); raise kv_cache_max_length."
            )
        owned = self._owned[slot]
        if not owned and prompt is not None:
            matched, taken = self._plan(num_tokens, prompt)
            if taken > self.num_free:
                raise OutOfPages(f"need {taken} more pages, {self.num_free} free")
            for page in matched:
                self._idle.pop(page, None)
                self._use(slot, page)
            self._shared[slot] = len(matched)
            self.shared_hits += len(matched)
        extra = need - len(owned)
        if extra > self.num_free:
            raise OutOfPages(f"need {extra} more pages, {self.num_free} free")
        for _ in range(max(extra, 0)):
            self._use(slot, self._take())
        return list(owned)

    def choice_pages_for(self, num_tokens: int, prompt_len: int) -> int:
        """New pages `reserve_choice` takes: all but the prompt's full pages."""
        return max(self.pages_for(num_tokens) - prompt_len // self.page_size, 0)

    def reserve_choice(self, slot: int, first: int, num_tokens: int, prompt_len: int) -> list[int]:
        """Make `slot` (owning nothing) another choice of the prompt `first` holds: the pages of
        `first` that the prompt's `prompt_len` tokens fill are taken by reference (never written:
        decoding writes from the prompt's end on), then new pages up to `num_tokens`."""
        if self._owned[slot]:
            raise ValueError(f"slot {slot} already owns pages")
        need = self.pages_for(num_tokens)
        if need > self.pages_per_slot:
            raise OutOfPages(
                f"{num_tokens} tokens need {need} pages, more than a slot holds "
                f"({self.pages_per_slot}); raise kv_cache_max_length."
            )
        full = min(prompt_len // self.page_size, need, len(self._owned[first]))
        extra = need - full
        if extra > self.num_free:
            raise OutOfPages(f"need {extra} more pages, {self.num_free} free")
        for page in self._owned[first][:full]:
            self._use(slot, page)
        self._shared[slot] = full
        for _ in range(extra):
            self._use(slot, self._take())
        return list(self._owned[slot])

    def try_reserve(
        self, slot: int, num_tokens: int, prompt=None, first: int | None = None
    ) -> bool:
        """`reserve` (or, with `first`, `reserve_choice` of `prompt`) when enough pages are free;
        False, taking nothing, when not."""
        if first is not None:
            if self.choice_pages_for(num_tokens, len(prompt)) > self.num_free:
                return False
            self.reserve_choice(slot, first, num_tokens, len(prompt))
        elif self.can_reserve(slot, num_tokens, prompt):
            self.reserve(slot, num_tokens, prompt)
        else:
            return False
        return True

    def _use(self, slot: int, page: int) -> None:
        owned = self._owned[slot]
        self.table[slot, len(owned)] = page
        owned.append(page)
        self._refs[page] += 1

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        page, _ = self._idle.popitem(last=False)  # the least recently released indexed page
        del self._index[self._key_of.pop(page)]
        return page

    def shared(self, slot: int) -> int:
        """Leading pages of `slot` taken by reference (already hold its prompt: never written)."""
        return self._shared[slot]

    def register(self, slot: int, prompt) -> None:
        """`slot`'s prompt is stored: index its full pages for later prompts (sharing only)."""
        if not self.share_prefixes:
            return
        for key, page in zip(self._page_keys(prompt), self._owned[slot]):
            if key not in self._index and page not in self._key_of:
                self._index[key], self._key_of[page] = page, key

    def release(self, slot: int) -> int:
        """Give back every page of `slot` (indexed ones stay indexed while unused); returns how
        many."""
        owned = self._owned[slot]
        for page in reversed(owned):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)
        n = len(owned)
        self._owned[slot] = []
        self._shared[slot] = 0
        self.table[slot] = NULL_PAGE
        return n

    def owned(self, slot: int) -> list[int]:
        return list(self._owned[slot])
