"""Flash attention for GPUs: Pallas kernels in the Triton-lowering style.

One program per (batch, head, q_block) keeps its query block in registers and loops over key
blocks with lax.fori_loop, slicing K/V refs with pl.ds; loop bounds skip blocks hidden by the
causal / sliding-window mask. Backward: a dq kernel of the same shape and a dk/dv kernel per
(batch, kv_head, k_block) that loops over the query heads of its group and their query blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llm_kernels.flash_attention import _block
from llm_kernels.flash_attention.config import AttentionConfig, round_up

F32 = jnp.float32


def _iota(shape: tuple[int, int], axis: int, start) -> jax.Array:
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _key_block_range(q0, bq: int, bk: int, nk: int, cfg: AttentionConfig, q_len: int, kv_len: int):
    """[lo, hi) of key blocks that queries [q0, q0 + bq) can see."""
    offset = cfg.visible_offset(q_len, kv_len)
    lo, hi = jnp.int32(0), jnp.int32(nk)
    if cfg.causal:
        hi = jnp.clip((q0 + bq - 1 + offset) // bk + 1, 0, nk)
    if cfg.sliding_window is not None:
        lo = jnp.clip((q0 + offset - cfg.sliding_window + 1) // bk, 0, nk)
    return lo, hi


def _query_block_range(
    k0, bk: int, bq: int, nq: int, cfg: AttentionConfig, q_len: int, kv_len: int
):
    """[lo, hi) of query blocks that can see keys [k0, k0 + bk)."""
    offset = cfg.visible_offset(q_len, kv_len)
    lo, hi = jnp.int32(0), jnp.int32(nq)
    if cfg.causal:
        lo = jnp.clip((k0 - offset) // bq, 0, nq)
    if cfg.sliding_window is not None:
        last_key = jnp.minimum(k0 + bk, kv_len) - 1
        hi = jnp.clip((last_key + cfg.sliding_window - 1 - offset) // bq + 1, 0, nq)
    return lo, hi


def _segs(segment_ids, lq_pad: int, lk_pad: int):
    return [_block.pad_seq(segment_ids, 1, lq_pad, -1), _block.pad_seq(segment_ids, 1, lk_pad, -2)]


def _fwd_kernel(*refs, cfg, q_len, kv_len, has_seg, bk, nk):
    q_ref, k_ref, v_ref = refs[:3]
    qs_ref, ks_ref = refs[3:5] if has_seg else (None, None)
    o_ref, lse_ref = refs[-2:]
    bq, dim = q_ref.shape
    q0 = pl.program_id(2) * bq
    q = q_ref[...]
    q_idx = _iota((bq, 1), 0, q0)
    q_seg = qs_ref[...][:, None] if has_seg else None

    def step(j, carry):
        m, denom, acc = carry
        k0 = j * bk
        k, v = k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :]
        k_seg = ks_ref[pl.ds(k0, bk)][None, :] if has_seg else None
        visible = _block.mask(q_idx, _iota((1, bk), 1, k0), q_seg, k_seg, cfg, q_len, kv_len)
        return _block.online_softmax_step(_block.scores(q, k, cfg), visible, m, denom, acc, v)

    lo, hi = _key_block_range(q0, bq, bk, nk, cfg, q_len, kv_len)
    init = (jnp.full((bq, 1), -jnp.inf, F32), jnp.zeros((bq, 1), F32), jnp.zeros((bq, dim), F32))
    m, denom, acc = jax.lax.fori_loop(lo, hi, step, init)
    out, lse = _block.finalize(m, denom, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _geometry(q, k, cfg: AttentionConfig):
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    lq_pad, lk_pad = round_up(q_len, cfg.block_q), round_up(kv_len, cfg.block_k)
    return batch, q_len, kv_len, heads, kv_heads, dim, lq_pad, lk_pad


def forward(q, k, v, segment_ids, cfg: AttentionConfig):
    """(out [B, Lq, H, D], lse [B, H, Lq]) via the Triton-style forward kernel."""
    batch, q_len, kv_len, heads, kv_heads, dim, lq_pad, lk_pad = _geometry(q, k, cfg)
    group, bq, bk = heads // kv_heads, cfg.block_q, cfg.block_k
    has_seg = segment_ids is not None
    args = [_block.to_heads_major(x, n) for x, n in ((q, lq_pad), (k, lk_pad), (v, lk_pad))]
    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, lk_pad, dim), lambda b, h, i: (b, h // group, 0, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    if has_seg:
        args += _segs(segment_ids, lq_pad, lk_pad)
        in_specs += [
            pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, lk_pad), lambda b, h, i: (b, 0)),
        ]
    kernel = functools.partial(
        _fwd_kernel, cfg=cfg, q_len=q_len, kv_len=kv_len, has_seg=has_seg, bk=bk, nk=lk_pad // bk
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, heads, lq_pad // bq),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, lq_pad, dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, lq_pad), F32),
        ],
        interpret=cfg.interpret,
    )(*args)
    return _block.from_heads_major(out, q_len), lse[:, :, :q_len]


def _dq_kernel(*refs, cfg, q_len, kv_len, has_seg, bk, nk):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dq_ref = refs[-1]
    bq, dim = q_ref.shape
    q0 = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_idx = _iota((bq, 1), 0, q0)
    q_seg = qs_ref[...][:, None] if has_seg else None

    def step(j, dq):
        k0 = j * bk
        k, v = k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :]
        k_seg = ks_ref[pl.ds(k0, bk)][None, :] if has_seg else None
        visible = _block.mask(q_idx, _iota((1, bk), 1, k0), q_seg, k_seg, cfg, q_len, kv_len)
        _, ds = _block.backward_block(q, k, v, do, lse, delta, visible, cfg)
        return dq + _block.dot_nn(ds.astype(k.dtype), k)

    lo, hi = _key_block_range(q0, bq, bk, nk, cfg, q_len, kv_len)
    dq = jax.lax.fori_loop(lo, hi, step, jnp.zeros((bq, dim), F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg, q_len, kv_len, has_seg, bq, nq, group):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dk_ref, dv_ref = refs[-2:]
    bk, dim = k_ref.shape
    k0 = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]
    k_idx = _iota((1, bk), 1, k0)
    k_seg = ks_ref[...][None, :] if has_seg else None
    lo, hi = _query_block_range(k0, bk, bq, nq, cfg, q_len, kv_len)

    def head(g, carry):
        def step(i, carry):
            dk, dv = carry
            q0 = i * bq
            q, do = q_ref[g, pl.ds(q0, bq), :], do_ref[g, pl.ds(q0, bq), :]
            lse = lse_ref[g, pl.ds(q0, bq)][:, None]
            delta = delta_ref[g, pl.ds(q0, bq)][:, None]
            q_seg = qs_ref[pl.ds(q0, bq)][:, None] if has_seg else None
            visible = _block.mask(_iota((bq, 1), 0, q0), k_idx, q_seg, k_seg, cfg, q_len, kv_len)
            p, ds = _block.backward_block(q, k, v, do, lse, delta, visible, cfg)
            dv = dv + _block.dot_tn(p.astype(do.dtype), do)
            dk = dk + _block.dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return jax.lax.fori_loop(lo, hi, step, carry)

    zeros = jnp.zeros((bk, dim), F32)
    dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, out, lse, dout, cfg: AttentionConfig):
    """(dq, dk, dv) via the Triton-style dq and dk/dv kernels."""
    batch, q_len, kv_len, heads, kv_heads, dim, lq_pad, lk_pad = _geometry(q, k, cfg)
    group, bq, bk = heads // kv_heads, cfg.block_q, cfg.block_k
    nq, nk = lq_pad // bq, lk_pad // bk
    has_seg = segment_ids is not None
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(F32), dout.astype(F32))
    rows = [_block.pad_seq(x, 2, lq_pad) for x in (lse, delta)]
    qh, doh = _block.to_heads_major(q, lq_pad), _block.to_heads_major(dout, lq_pad)
    kh, vh = _block.to_heads_major(k, lk_pad), _block.to_heads_major(v, lk_pad)
    segs = _segs(segment_ids, lq_pad, lk_pad) if has_seg else []
    static = {"cfg": cfg, "q_len": q_len, "kv_len": kv_len, "has_seg": has_seg}

    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i: (b, h, i, 0))
    kv_full = pl.BlockSpec((None, None, lk_pad, dim), lambda b, h, i: (b, h // group, 0, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    seg_specs = [
        pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, lk_pad), lambda b, h, i: (b, 0)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bk=bk, nk=nk, **static),
        grid=(batch, heads, nq),
        in_specs=[q_spec, kv_full, kv_full, q_spec, row_spec, row_spec]
        + (seg_specs if has_seg else []),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        interpret=cfg.interpret,
    )(qh, kh, vh, doh, *rows, *segs)

    # The group's query heads hk*G .. hk*G+G-1 form block hk of size G along the head axis.
    q_group = pl.BlockSpec((None, group, lq_pad, dim), lambda b, hk, j: (b, hk, 0, 0))
    row_group = pl.BlockSpec((None, group, lq_pad), lambda b, hk, j: (b, hk, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda b, hk, j: (b, hk, j, 0))
    seg_specs2 = [
        pl.BlockSpec((None, lq_pad), lambda b, hk, j: (b, 0)),
        pl.BlockSpec((None, bk), lambda b, hk, j: (b, j)),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, bq=bq, nq=nq, group=group, **static),
        grid=(batch, kv_heads, nk),
        in_specs=[q_group, kv_spec, kv_spec, q_group, row_group, row_group]
        + (seg_specs2 if has_seg else []),
        out_specs=[kv_spec, kv_spec],
        out_shape=[
            jax.ShapeDtypeStruct(kh.shape, k.dtype),
            jax.ShapeDtypeStruct(vh.shape, v.dtype),
        ],
        interpret=cfg.interpret,
    )(qh, kh, vh, doh, *rows, *segs)
    return (
        _block.from_heads_major(dq, q_len),
        _block.from_heads_major(dk, kv_len),
        _block.from_heads_major(dv, kv_len),
    )
