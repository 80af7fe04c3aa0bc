"""Page allocator: free list, page table, reservations, release."""

from __future__ import annotations

import pytest

from llm_serve.kv_pages import NULL_PAGE, OutOfPages, PageAllocator


def test_reserve_grows_and_release_returns_everything():
    a = PageAllocator(num_pages=9, page_size=4, slots=2, pages_per_slot=4)
    assert a.num_free == 8 and a.capacity == 8
    assert a.reserve(0, 5) == [1, 2]
    assert a.reserve(0, 5) == [1, 2]  # idempotent
    assert a.reserve(0, 9) == [1, 2, 3]
    a.reserve(1, 1)
    assert a.num_free == 4
    assert list(a.table[0]) == [1, 2, 3, NULL_PAGE]
    assert a.release(0) == 3
    assert a.num_free == 7 and list(a.table[0]) == [NULL_PAGE] * 4
    assert a.release(0) == 0  # releasing twice is harmless
    a.release(1)
    assert a.num_free == 8


def test_exhaustion_and_slot_limit():
    a = PageAllocator(num_pages=4, page_size=4, slots=2, pages_per_slot=4)
    a.reserve(0, 8)
    assert not a.can_reserve(1, 8)
    with pytest.raises(OutOfPages):
        a.reserve(1, 8)
    assert a.num_free == 1  # a failed reservation takes nothing
    with pytest.raises(OutOfPages, match="kv_cache_max_length"):
        a.reserve(1, 17)


def test_pages_are_never_shared():
    a = PageAllocator(num_pages=17, page_size=2, slots=4, pages_per_slot=4)
    for round_ in range(3):
        for s in range(4):
            a.reserve(s, 2 + 2 * ((s + round_) % 4))
        owned = [p for s in range(4) for p in a.owned(s)]
        assert len(owned) == len(set(owned)) and NULL_PAGE not in owned
        for s in range(4):
            a.release(s)
    assert a.num_free == 16


def test_null_page_is_reserved():
    with pytest.raises(ValueError, match="kv_num_pages"):
        PageAllocator(num_pages=1, page_size=4, slots=1, pages_per_slot=1)


def test_choices_share_the_prompt_pages_by_reference():
    """A 10-token prompt (page size 4) fills 2 pages: another choice takes those by reference and
    its own pages from the third on; each page is free again only when its last user leaves."""
    a = PageAllocator(num_pages=17, page_size=4, slots=3, pages_per_slot=4)
    first = a.reserve(0, 14)
    assert a.choice_pages_for(14, 10) == 2
    second = a.reserve_choice(1, 0, 14, 10)
    assert second[:2] == first[:2] and not set(second[2:]) & set(first)
    assert a.shared(1) == 2 and a.num_free == 16 - 6
    with pytest.raises(ValueError, match="already owns"):
        a.reserve_choice(1, 0, 14, 10)
    a.release(0)  # the shared pages stay with choice 1
    assert a.num_free == 16 - 4 and a.owned(1) == second
    with pytest.raises(OutOfPages, match="kv_cache_max_length"):
        a.reserve_choice(2, 1, 17, 10)
    a.release(1)
    assert a.num_free == 16
