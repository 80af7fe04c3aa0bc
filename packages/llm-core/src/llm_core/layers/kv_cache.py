"""Per-layer attention caches. Attention owns its cache: nothing outside `Attention` and this module
knows a cache's layout.

Every cache class is a pytree with two methods used by attention on one layer:

    cache = cache.write(k, v, positions)        # new tokens' K/V [B, T, K, D] at positions [B, T]
    out = cache.attend(q, positions, spec, ...)  # causal attention of q [B, T, H, D] over the cache
                                                 # (backend, chunk, sinks [H] as the layer's)

and serving operations that work with or without leading stacked-layer axes (so llm-serve can apply
them to a whole model's cache with `map_layer_caches`, never looking inside):

- `ContiguousKV` [..., B, K, L, D] (head-major, as decode attention reads it): a token at position p
  lives at index p of L; `resize(length)` cuts or
  pads L, `insert(row, slot)` copies a batch-of-one cache into row `slot`, `row(i)` is batch row
  i as a batch-of-one cache.
- `PagedKV`: pools [..., K, num_pages, page_size, D] (the layout `llm_kernels.paged_attention` reads)
  and a page table [..., B, pages_per_slot]; token p of row b lives in page `table[b, p // page_size]`
  at offset `p % page_size`. Page 0 is the null page: empty table entries point at it. One-token decode
  steps are read in place by the paged kernel; `write_prefix(contiguous, pages)` stores a prefilled
  prompt, `with_table(table)` installs a new page table.

- `Int8ContiguousKV` / `Int8PagedKV` (`kv_cache_dtype: int8`): the float caches in int8 with
  per-token, per-head scales. A decode step on the CPU is read in place, int8 rows and scales, by
  llm-kernels' C++ decode attention (`reads_int8_in_place`); elsewhere, and for prompt chunks, the
  cache (the paged one: a row's gathered pages) is dequantized first.
- `LatentKV` and `PagedLatentKV` (`latent_cache.py`): MLA's one latent row per token.

Positions at or beyond a cache's capacity are dropped on write (use that for padding tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from llm_core.layers import attention_ops as ops

NULL_PAGE = 0


class LayerCache:
    """Marker base of every per-layer cache class (what `map_layer_caches` treats as a leaf)."""


class PagedTable:
    """What the paged caches share: a page table [..., B, pages_per_slot] over pools whose
    axis -2 is the page size (`first_pool` names one of them)."""

    def first_pool(self):
        return self.k

    @property
    def page_size(self) -> int:
        return self.first_pool().shape[-2]

    @property
    def max_len(self) -> int:
        """Positions the page table covers."""
        return self.table.shape[-1] * self.page_size

    def with_table(self, table):
        return self.replace(table=broadcast_table(self.table, table))


def _attend_contiguous(q, k, v, positions, spec, backend: str, chunk: int, sinks=None):
    """q [B, T, H, D] over head-major k, v [B, K, L, D] (key j at position j)."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if q.shape[1] == 1:  # a decode step
        return ops.decode_attention(q, k, v, positions, spec, sinks=sinks)
    k, v = token_major(k), token_major(v)
    kv_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
    if backend == "chunked":
        return ops.chunked_attention(q, k, v, positions, kv_pos, spec, chunk=chunk, sinks=sinks)
    return ops.dot_product_attention(q, k, v, positions, kv_pos, spec, sinks=sinks)


@struct.dataclass
class ContiguousKV(LayerCache):
    k: jax.Array  # [..., B, K, L, D]
    v: jax.Array

    @classmethod
    def create(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> ContiguousKV:
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[-2]

    def write(self, k, v, positions) -> ContiguousKV:
        return ContiguousKV(k=put_tokens(self.k, k, positions), v=put_tokens(self.v, v, positions))

    def attend(self, q, positions, spec, backend="dot_product", chunk=512, sinks=None):
        return _attend_contiguous(q, self.k, self.v, positions, spec, backend, chunk, sinks)

    # ------------------------------------------------------------------ serving
    def resize(self, length: int) -> ContiguousKV:
        return ContiguousKV(k=fit_length(self.k, length), v=fit_length(self.v, length))

    def insert(self, row: ContiguousKV, slot) -> ContiguousKV:
        """Copy a batch-of-one cache (length <= max_len) into row `slot`."""
        return ContiguousKV(k=put_row(self.k, row.k, slot), v=put_row(self.v, row.v, slot))

    def row(self, index: int) -> ContiguousKV:
        """Batch row `index` as a batch-of-one cache."""
        return ContiguousKV(k=take_row(self.k, index), v=take_row(self.v, index))


@struct.dataclass
class PagedKV(LayerCache, PagedTable):
    k: jax.Array  # [..., K, num_pages, page_size, D]
    v: jax.Array
    table: jax.Array  # [..., B, pages_per_slot] int32

    @classmethod
    def create(
        cls,
        batch: int,
        kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        pages_per_slot: int,
        dtype,
    ) -> PagedKV:
        shape = (kv_heads, num_pages, page_size, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            table=jnp.full((batch, pages_per_slot), NULL_PAGE, jnp.int32),
        )

    def write(self, k, v, positions) -> PagedKV:
        page, off = page_slots(self.table, positions, self.page_size)
        k = jnp.moveaxis(k, 2, 0).astype(self.k.dtype)  # [K, B, T, D]
        v = jnp.moveaxis(v, 2, 0).astype(self.v.dtype)
        return self.replace(k=self.k.at[:, page, off].set(k), v=self.v.at[:, page, off].set(v))

    def attend(self, q, positions, spec, backend="dot_product", chunk=512, sinks=None):
        return attend_paged(q, self.k, self.v, self.table, positions, spec, backend, chunk, sinks)

    # ------------------------------------------------------------------ serving
    def write_prefix(self, prefix: ContiguousKV, pages) -> PagedKV:
        """Store a batch-of-one contiguous cache of length len(pages) * page_size into `pages`."""
        return self.replace(
            k=prefix_to_pages(self.k, prefix.k, pages), v=prefix_to_pages(self.v, prefix.v, pages)
        )


def _quantize_rows(x):
    """[..., D] -> (int8 [..., D], float32 scale [..., 1]): symmetric, per token and head."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


@struct.dataclass
class Int8ContiguousKV(LayerCache):
    """`ContiguousKV` stored as int8 with a float32 scale per token and head (`kv_cache_dtype:
    int8`): D + 4 bytes per token, head and K/V instead of 4 D (float32) or 2 D (bfloat16).
    Attention dequantizes one layer's cache at a time."""

    k: jax.Array  # [..., B, K, L, D] int8
    v: jax.Array
    k_scale: jax.Array  # [..., B, K, L, 1] float32
    v_scale: jax.Array

    @classmethod
    def create(cls, batch: int, max_len: int, kv_heads: int, head_dim: int) -> Int8ContiguousKV:
        shape, scales = (batch, kv_heads, max_len, head_dim), (batch, kv_heads, max_len, 1)
        return cls(  # four distinct buffers: the engine donates each one
            k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
            k_scale=jnp.ones(scales, jnp.float32), v_scale=jnp.ones(scales, jnp.float32),
        )  # fmt: skip

    @property
    def max_len(self) -> int:
        return self.k.shape[-2]

    def write(self, k, v, positions) -> Int8ContiguousKV:
        (kq, ks), (vq, vs) = _quantize_rows(k), _quantize_rows(v)

        def put(a, x):
            return put_tokens(a, x, positions)

        return Int8ContiguousKV(
            k=put(self.k, kq), v=put(self.v, vq),
            k_scale=put(self.k_scale, ks), v_scale=put(self.v_scale, vs),
        )  # fmt: skip

    def attend(self, q, positions, spec, backend="dot_product", chunk=512, sinks=None):
        if reads_int8_in_place(q, spec):
            import llm_kernels

            out = llm_kernels.decode_attention(
                q[:, 0], self.k, self.v, (positions[:, 0] + 1).astype(jnp.int32),
                sm_scale=spec.scale, logit_soft_cap=spec.logit_softcap,
                sliding_window=spec.sliding_window, sinks=sinks, backend="cpu",
                k_scale=self.k_scale, v_scale=self.v_scale,
            )  # fmt: skip
            return out[:, None]
        k = (self.k.astype(jnp.float32) * self.k_scale).astype(q.dtype)
        v = (self.v.astype(jnp.float32) * self.v_scale).astype(q.dtype)
        return _attend_contiguous(q, k, v, positions, spec, backend, chunk, sinks)

    # ------------------------------------------------------------------ serving
    def resize(self, length: int) -> Int8ContiguousKV:
        return Int8ContiguousKV(
            k=fit_length(self.k, length), v=fit_length(self.v, length),
            k_scale=fit_length(self.k_scale, length, 1.0),
            v_scale=fit_length(self.v_scale, length, 1.0),
        )  # fmt: skip

    def insert(self, row: Int8ContiguousKV, slot) -> Int8ContiguousKV:
        """Copy a batch-of-one cache (length <= max_len) into row `slot`."""
        return Int8ContiguousKV(
            k=put_row(self.k, row.k, slot), v=put_row(self.v, row.v, slot),
            k_scale=put_row(self.k_scale, row.k_scale, slot),
            v_scale=put_row(self.v_scale, row.v_scale, slot),
        )  # fmt: skip

    def row(self, index: int) -> Int8ContiguousKV:
        """Batch row `index` as a batch-of-one cache."""
        return jax.tree.map(lambda a: take_row(a, index), self)


@struct.dataclass
class Int8PagedKV(LayerCache, PagedTable):
    """`PagedKV` stored as int8 with a float32 scale per token and head: D + 4 bytes per token,
    head and K/V. Attention gathers and dequantizes each row's pages (prefill and decode alike)."""

    k: jax.Array  # [..., K, num_pages, page_size, D] int8
    v: jax.Array
    k_scale: jax.Array  # [..., K, num_pages, page_size, 1] float32
    v_scale: jax.Array
    table: jax.Array  # [..., B, pages_per_slot] int32

    @classmethod
    def create(
        cls, batch: int, kv_heads: int, head_dim: int, num_pages: int, page_size: int,
        pages_per_slot: int,
    ) -> Int8PagedKV:  # fmt: skip
        shape, scales = (
            (kv_heads, num_pages, page_size, head_dim),
            (kv_heads, num_pages, page_size, 1),
        )
        return cls(
            k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
            k_scale=jnp.ones(scales, jnp.float32), v_scale=jnp.ones(scales, jnp.float32),
            table=jnp.full((batch, pages_per_slot), NULL_PAGE, jnp.int32),
        )  # fmt: skip

    def write(self, k, v, positions) -> Int8PagedKV:
        page, off = page_slots(self.table, positions, self.page_size)
        (kq, ks), (vq, vs) = _quantize_rows(k), _quantize_rows(v)

        def put(pool, x):  # x [B, T, K, *] -> pool[:, page, off]
            return pool.at[:, page, off].set(jnp.moveaxis(x, 2, 0).astype(pool.dtype))

        return self.replace(
            k=put(self.k, kq), v=put(self.v, vq),
            k_scale=put(self.k_scale, ks), v_scale=put(self.v_scale, vs),
        )  # fmt: skip

    def attend(self, q, positions, spec, backend="dot_product", chunk=512, sinks=None):
        if reads_int8_in_place(q, spec):
            scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
            return paged_decode(q, self.k, self.v, self.table, positions, spec, sinks, **scales)

        def read(pool, scale):
            values = gather_pages(pool, self.table).astype(jnp.float32)
            return (values * gather_pages(scale, self.table)).astype(q.dtype)

        k, v = read(self.k, self.k_scale), read(self.v, self.v_scale)
        return _attend_contiguous(q, k, v, positions, spec, backend, chunk, sinks)

    def write_prefix(self, prefix: Int8ContiguousKV, pages) -> Int8PagedKV:
        """Store a batch-of-one `Int8ContiguousKV` of length len(pages) * page_size into `pages`."""
        return self.replace(
            k=prefix_to_pages(self.k, prefix.k, pages),
            v=prefix_to_pages(self.v, prefix.v, pages),
            k_scale=prefix_to_pages(self.k_scale, prefix.k_scale, pages),
            v_scale=prefix_to_pages(self.v_scale, prefix.v_scale, pages),
        )


# ---------------------------------------------------------------------- layout helpers
# Shared by every cache class (and latent_cache.py). Contiguous arrays are [..., B, K, L, D]
# (L at axis -2, B at axis -4); paged pools are [..., K, num_pages, page_size, D].


def put_tokens(a, x, positions):
    """Write tokens x [B, T, K, D] at positions [B, T] of a contiguous array [B, K, L, D]
    (positions beyond L dropped)."""
    batch = jnp.arange(x.shape[0])[:, None]
    return a.at[batch, :, positions].set(x.astype(a.dtype), mode="drop")


def token_major(a):
    """[..., B, K, L, D] -> [..., B, L, K, D], the layout of the training attention backends
    (prompt chunks only: a decode step reads the head-major cache as it is)."""
    return jnp.swapaxes(a, -3, -2)


def fit_length(a, length: int, fill=0):
    """Cut or pad the length axis (-2) of a contiguous cache array to `length`."""
    if a.shape[-2] >= length:
        return a[..., :length, :]
    pad = [(0, 0)] * a.ndim
    pad[-2] = (0, length - a.shape[-2])
    return jnp.pad(a, pad, constant_values=fill)


def put_row(a, row, slot):
    """Copy a batch-of-one contiguous array into batch row `slot` of `a`."""
    return jax.lax.dynamic_update_slice_in_dim(a, row.astype(a.dtype), slot, a.ndim - 4)


def take_row(a, index: int):
    """Batch row `index` of a contiguous array, keeping the batch axis (size 1)."""
    return jax.lax.slice_in_dim(a, index, index + 1, axis=a.ndim - 4)


def page_slots(table, positions, page_size: int):
    """(page, offset) of each position [B, T]; positions beyond the table go to the null page."""
    n = table.shape[-1]
    page = jnp.take_along_axis(table, jnp.minimum(positions // page_size, n - 1), axis=1)
    return jnp.where(positions < n * page_size, page, NULL_PAGE), positions % page_size


def broadcast_table(current, table):
    """A new page table [B, pages] broadcast over the leading stacked-layer axes of `current`."""
    table = jnp.asarray(table, jnp.int32)
    return jnp.broadcast_to(table, current.shape[:-2] + table.shape)


def gather_pages(pool, table):
    """[K, P, ps, D] -> contiguous [B, K, n * ps, D] of every row's pages."""
    kh, _, ps, d = pool.shape
    b, n = table.shape
    view = pool[:, table]  # [K, B, n, ps, D]
    return jnp.swapaxes(view, 0, 1).reshape(b, kh, n * ps, d)


def prefix_to_pages(pool, src, pages):
    """Store a batch-of-one contiguous array [..., 1, K, L, D] (L = len(pages) * page_size) into
    `pages` of the pool [..., K, P, ps, D]."""
    src = src[..., 0, :, :, :]  # [..., K, L, D]
    src = src.reshape(*src.shape[:-2], pages.shape[0], pool.shape[-2], src.shape[-1])
    return pool.at[..., pages, :, :].set(src.astype(pool.dtype))


def attend_paged(q, k_pool, v_pool, table, positions, spec, backend: str, chunk: int, sinks=None):
    """Attention of q [B, T, H, D] over paged pools: a prompt chunk (T > 1) attends over a
    gathered view of its rows' pages, a decode step (T = 1) is read in place by the paged kernel
    (except under Llama 4's chunk mask, which the kernel lacks: gathered too)."""
    if q.shape[1] != 1 or spec.chunk is not None:  # the paged kernel has no chunk mask
        k, v = gather_pages(k_pool, table), gather_pages(v_pool, table)
        return _attend_contiguous(q, k, v, positions, spec, backend, chunk, sinks)
    return paged_decode(q, k_pool.astype(q.dtype), v_pool.astype(q.dtype), table, positions, spec,
                        sinks)  # fmt: skip


def paged_decode(q, k_pool, v_pool, table, positions, spec, sinks=None, **scales):
    """One decode step (q [B, 1, H, D]) over paged pools through `llm_kernels.paged_attention`
    (`scales`: k_scale / v_scale of int8 pools)."""
    import llm_kernels

    max_len = table.shape[-1] * k_pool.shape[-2]
    lengths = jnp.clip(positions[:, 0] + 1, 1, max_len).astype(jnp.int32)
    out = llm_kernels.paged_attention(
        q[:, 0], k_pool, v_pool, lengths, table,
        sm_scale=spec.scale, logit_soft_cap=spec.logit_softcap,
        sliding_window=spec.sliding_window, sinks=sinks, **scales,
    )  # fmt: skip
    return out[:, None]


def reads_int8_in_place(q, spec) -> bool:
    """Whether a step over an int8 cache goes to llm-kernels' C++ decode attention, which reads the
    int8 rows and their scales in place; otherwise the cache is dequantized first."""
    return q.shape[1] == 1 and ops.decode_kernel_applies(q, spec, jnp.int8)


def is_layer_cache(x) -> bool:
    return isinstance(x, LayerCache)


def map_layer_caches(fn, cache, *rest):
    """Apply `fn` to every layer cache of a model cache (a pytree holding them)."""
    return jax.tree.map(fn, cache, *rest, is_leaf=is_layer_cache)


def stack_cache(cache, repeats: int):
    """A cache with a leading stacked-layer axis of size `repeats` (for scanned layer groups)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (repeats, *a.shape)), cache)
