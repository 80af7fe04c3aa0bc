"""Multi-head latent attention (MLA) caches: one latent row per token instead of K and V per head.

A row is [c, k_rope]: the normalised `kv_lora_rank` latent and the `qk_rope_head_dim` rotary key
shared by all heads, so a token costs kv_lora_rank + qk_rope_head_dim values per layer (DeepSeek-V3:
576, where full per-head K/V would be 128 x (192 + 128) = 40960). MLA attends over the rows in its
absorbed form (`llm_core.layers.mla`): the row serves as the single key head and as the value, so
both caches below are read like a one-head K/V cache whose K and V are the same array, with the same
attention backends and the same paged kernel, and never hold a second copy.

- `LatentKV` [..., B, 1, L, W]: token p of row b at index p (W = kv_lora_rank + qk_rope_head_dim).
- `PagedLatentKV`: a pool [..., 1, num_pages, page_size, W] and a page table, as `PagedKV`.

Both have the serving methods of the K/V caches (`resize`, `insert`, `row`, `write_prefix`,
`with_table`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from llm_core.layers.kv_cache import (
    NULL_PAGE,
    LayerCache,
    PagedTable,
    _attend_contiguous,
    attend_paged,
    fit_length,
    page_slots,
    prefix_to_pages,
    put_row,
    put_tokens,
    take_row,
)


@struct.dataclass
class LatentKV(LayerCache):
    rows: jax.Array  # [..., B, 1, L, W]

    @classmethod
    def create(cls, batch: int, max_len: int, width: int, dtype) -> LatentKV:
        return cls(rows=jnp.zeros((batch, 1, max_len, width), dtype))

    @property
    def max_len(self) -> int:
        return self.rows.shape[-2]

    def write(self, rows, positions) -> LatentKV:
        """rows [B, T, W] at positions [B, T] (beyond the cache: dropped)."""
        return LatentKV(rows=put_tokens(self.rows, rows[:, :, None], positions))

    def attend(self, q, positions, spec, backend="dot_product", chunk=512, sinks=None):
        """q [B, T, H, W] -> [B, T, H, W]: softmax(q . rows) . rows (callers keep the latent part)."""
        return _attend_contiguous(q, self.rows, self.rows, positions, spec, backend, chunk, sinks)

    def resize(self, length: int) -> LatentKV:
        return LatentKV(rows=fit_length(self.rows, length))

    def insert(self, row: LatentKV, slot) -> LatentKV:
        """Copy a batch-of-one cache (length <= max_len) into row `slot`."""
        return LatentKV(rows=put_row(self.rows, row.rows, slot))

    def row(self, index: int) -> LatentKV:
        """Batch row `index` as a batch-of-one cache."""
        return LatentKV(rows=take_row(self.rows, index))


@struct.dataclass
class PagedLatentKV(LayerCache, PagedTable):
    pool: jax.Array  # [..., 1, num_pages, page_size, W]
    table: jax.Array  # [..., B, pages_per_slot] int32

    @classmethod
    def create(
        cls, batch: int, width: int, num_pages: int, page_size: int, pages_per_slot: int, dtype
    ) -> PagedLatentKV:
        return cls(
            pool=jnp.zeros((1, num_pages, page_size, width), dtype),
            table=jnp.full((batch, pages_per_slot), NULL_PAGE, jnp.int32),
        )

    def first_pool(self):
        return self.pool

    def write(self, rows, positions) -> PagedLatentKV:
        page, off = page_slots(self.table, positions, self.page_size)
        return self.replace(pool=self.pool.at[0, page, off].set(rows.astype(self.pool.dtype)))

    def attend(self, q, positions, spec, backend="dot_product", chunk=512, sinks=None):
        pool, table = self.pool, self.table
        return attend_paged(q, pool, pool, table, positions, spec, backend, chunk, sinks)

    def write_prefix(self, prefix: LatentKV, pages) -> PagedLatentKV:
        """Store a batch-of-one `LatentKV` of length len(pages) * page_size into `pages`."""
        return self.replace(pool=prefix_to_pages(self.pool, prefix.rows, pages))
