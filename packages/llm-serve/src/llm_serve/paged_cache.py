"""Paged KV cache on the device, and the decode step that runs the model over it.

Layout: `k, v [num_layers, num_pages, page_size, kv_heads, head_dim]` shared by all slots, and a page
table `[slots, pages_per_slot]` (host bookkeeping in `kv_pages.PageAllocator`). Token `p` of slot `s`
lives in page `table[s, p // page_size]` at offset `p % page_size`.

The model's `forward_with_cache` expects a contiguous cache, so one decode step (`forward`):

1. gathers every slot's pages into a contiguous `[num_layers, slots, max_len, ...]` view,
2. runs the model's cached forward on it (which writes the new token's K/V at its position),
3. scatters only the new token's K/V back into its page.

Memory cost: the gathered view is a transient buffer as large as a contiguous cache for all slots at
the current decode length (at most 2 * num_layers * slots * kv_cache_max_length * kv_heads *
head_dim * itemsize bytes), alive during the step. The
pool itself can be smaller than a contiguous cache (`kv_num_pages`), since short requests hold only
the pages they use. A decode-attention kernel reading pages in place (`llm_kernels.paged_attention`,
with a model hook taking the page table) would remove that buffer; the model exposes no such hook yet.
On the CPU the gather is plain jnp indexing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llm_core import KVCache
from llm_serve.kv_pages import NULL_PAGE


@struct.dataclass
class PagedKV:
    k: jax.Array  # [num_layers, num_pages, page_size, kv_heads, head_dim]
    v: jax.Array
    table: jax.Array  # [slots, pages_per_slot] int32

    @classmethod
    def init(cls, cfg, allocator, dtype) -> PagedKV:
        shape = (
            cfg.num_layers,
            allocator.num_pages,
            allocator.page_size,
            cfg.resolved_num_kv_heads,
            cfg.resolved_head_dim,
        )
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), table=jnp.asarray(allocator.table)
        )

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    def with_table(self, table: np.ndarray) -> PagedKV:
        return self.replace(table=jnp.asarray(table))

    def gather(self, length: int | None = None) -> KVCache:
        """Contiguous view [num_layers, slots, length, K, D] of every slot's first `length` tokens
        (a multiple of the page size; default: the whole page table)."""
        n_layers, _, ps, kh, d = self.k.shape
        slots, pps = self.table.shape
        n = pps if length is None else length // ps
        table = self.table[:, :n]

        def view(pool):
            return pool[:, table].reshape(n_layers, slots, n * ps, kh, d)

        return KVCache(k=view(self.k), v=view(self.v))

    def write_prefix(self, prefix: KVCache, pages: jax.Array) -> PagedKV:
        """Write a batch-of-one prefix cache (length = len(pages) * page_size) into `pages`."""
        n_layers, _, length, kh, d = prefix.k.shape
        n = pages.shape[0]

        def put(pool, src):
            return pool.at[:, pages].set(src[:, 0].reshape(n_layers, n, length // n, kh, d))

        return self.replace(k=put(self.k, prefix.k), v=put(self.v, prefix.v))


def forward(fwd, ids, pos, cache: PagedKV, active, length: int | None = None):
    """One decode step over a paged cache: ids, pos [slots, 1]; the view covers `length` tokens;
    `fwd(ids, positions, KVCache)` is the model's cached forward. Returns (logits, new PagedKV)."""
    view = cache.gather(length)
    logits, view = fwd(ids, pos, view)
    slots = ids.shape[0]
    p = jnp.clip(pos[:, 0], 0, view.max_len - 1)
    rows = jnp.arange(slots)
    page = jnp.where(active, cache.table[rows, p // cache.page_size], NULL_PAGE)
    off = p % cache.page_size
    new_k = view.k[:, rows, p]  # [num_layers, slots, K, D]
    new_v = view.v[:, rows, p]
    k = cache.k.at[:, page, off].set(new_k)
    v = cache.v.at[:, page, off].set(new_v)
    return logits, cache.replace(k=k, v=v)
