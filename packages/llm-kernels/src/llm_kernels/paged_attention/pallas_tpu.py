"""Paged decode attention as a Mosaic Pallas kernel.

Grid (batch, kv_head, page): lengths and page_indices are scalar-prefetched so the K/V
BlockSpec index maps fetch page page_indices[b, p] straight from the page pool. All query heads
of a kv head (the GQA group) are processed together as a [group, D] block; pages past the
sequence length are skipped and their index clamped to the last valid page (no extra fetch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm_kernels.flash_attention import _block
from llm_kernels.flash_attention.config import AttentionConfig

F32 = jnp.float32


def _kernel(lengths_ref, pages_ref, q_ref, k_ref, v_ref, *refs,
            cfg: AttentionConfig, page_size: int, n_pages: int, with_sinks: bool):  # fmt: skip
    sink_ref, (o_ref, m_scr, l_scr, acc_scr) = (refs[0], refs[1:]) if with_sinks else (None, refs)
    b, p = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]
    group = q_ref.shape[0]

    @pl.when(p == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    k0 = p * page_size
    live = k0 < length
    if cfg.sliding_window is not None:
        live &= (length - 1) - (k0 + page_size - 1) < cfg.sliding_window

    @pl.when(live)
    def _body():
        s = _block.scores(q_ref[...], k_ref[...], cfg)
        key = k0 + jax.lax.broadcasted_iota(jnp.int32, (group, page_size), 1)
        visible = key < length
        if cfg.sliding_window is not None:
            visible &= (length - 1) - key < cfg.sliding_window
        m, denom, acc = _block.online_softmax_step(
            s, visible, m_scr[...], l_scr[...], acc_scr[...], v_ref[...]
        )
        m_scr[...], l_scr[...], acc_scr[...] = m, denom, acc

    @pl.when(p == n_pages - 1)
    def _finish():
        m, denom, acc = m_scr[...], l_scr[...], acc_scr[...]
        if with_sinks:  # one more logit per head in the softmax, attending to nothing
            sink = sink_ref[...].astype(F32)
            m_new = jnp.maximum(m, sink)
            rescale = jnp.exp(m - m_new)  # 0 where no key was visible (m = -inf)
            m, denom, acc = m_new, denom * rescale + jnp.exp(sink - m_new), acc * rescale
        out, _ = _block.finalize(m, denom, acc)
        o_ref[...] = out.astype(o_ref.dtype)


def paged_attention_kernel(
    q, k_pages, v_pages, lengths, page_indices, cfg: AttentionConfig, sinks=None
):
    """q: [B, H, D] -> [B, H, D] via the Mosaic kernel (interpret=cfg.interpret); sinks: [H]
    learned logits added to every softmax's denominator (GPT-OSS), or None."""
    batch, heads, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group, n_pages = heads // kv_heads, page_indices.shape[1]

    def kv_map(b, h, p, lengths_ref, pages_ref):
        last = jnp.maximum((lengths_ref[b] + page_size - 1) // page_size - 1, 0)
        return (h, pages_ref[b, jnp.minimum(p, last)], 0, 0)

    kv_spec = pl.BlockSpec((None, None, page_size, dim), kv_map)
    q_spec = pl.BlockSpec((None, None, group, dim), lambda b, h, p, *_: (b, h, 0, 0))
    in_specs, extra = [q_spec, kv_spec, kv_spec], []
    if sinks is not None:  # [kv_heads, group, 1]: the group's sinks beside its [group, 1] stats
        in_specs.append(pl.BlockSpec((None, group, 1), lambda b, h, p, *_: (h, 0, 0)))
        extra.append(sinks.astype(F32).reshape(kv_heads, group, 1))
    kernel = functools.partial(
        _kernel, cfg=cfg, page_size=page_size, n_pages=n_pages, with_sinks=sinks is not None
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads, n_pages),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((group, 1), F32),
                pltpu.VMEM((group, 1), F32),
                pltpu.VMEM((group, dim), F32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, dim), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
    )(lengths, page_indices, q.reshape(batch, kv_heads, group, dim), k_pages, v_pages, *extra)
    return out.reshape(batch, heads, dim)
