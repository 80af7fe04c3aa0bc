"""Shared helpers for the cache-path tests (a uniquely named module, not a conftest)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from llm_core import map_layer_caches


def paged_cache(model, table, max_len: int = 16, num_pages: int = 5, page_size: int = 8):
    """A paged cache for len(table) rows with the given page table installed."""
    cache = model.init_cache(
        len(table), max_len, kind="paged", num_pages=num_pages, page_size=page_size
    )
    return map_layer_caches(lambda c: c.with_table(jnp.asarray(table, jnp.int32)), cache)


def decode_all(model, ids, cache, prompt: int) -> np.ndarray:
    """Prefill `prompt` tokens, then one token at a time: the logits of every position."""
    b, s = ids.shape
    logits, cache, _ = model.forward(ids[:, :prompt], None, None, cache)
    out = [logits]
    for t in range(prompt, s):
        step, cache, _ = model.forward(
            ids[:, t : t + 1], jnp.full((b, 1), t, jnp.int32), None, cache
        )
        out.append(step)
    return np.asarray(jnp.concatenate(out, 1))
