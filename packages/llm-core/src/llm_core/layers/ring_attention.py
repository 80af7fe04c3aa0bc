"""Context parallelism, `ring` strategy, with its own backward.

Inside a shard_map that is manual over `context` only, each device keeps its slice of the queries;
its K/V slice, with positions and segment ids, travels around the ring with `ppermute`, one hop
per step, while an online softmax folds in each visiting block. Masks use the travelling positions,
so they stay exact.

The backward is a second trip around the ring (a custom VJP, as in the ring-attention and flash
papers), not autodiff of the loop: autodiff would keep every visiting K/V block as a residual, so
each device would end up holding the whole sequence's K/V after all. Here the forward saves only
the local q, k, v, the output and each query's log-sum-exp; the backward sends each K/V block round
again together with its dK / dV accumulators, which arrive home after the last hop.

Work: the local sequence is cut into two halves, and a (query half, key half) pair whose keys all
come after its queries (fully hidden by the causal mask) is skipped with `lax.cond`, forward and
backward: about half the work of a causal ring. With `context_parallel_load_balance` every device
skips the same share.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from llm_core.layers.attention_ops import (
    CONTEXT_AXIS,
    NEG_INF,
    _online_softmax_init,
    _online_softmax_step,
    _sink_logits,
    _visible,
    context_size,
    einsum_f32,
)


def ring_attention(q, k, v, positions, segment_ids, spec, sinks=None, chunk: int = 512):
    """q [B,S,H,D]; k, v [B,S,K,D] split over `context` on S -> [B,S,H,Dv], as one device would
    compute it with the sequence whole. Each visiting block is taken `chunk` keys at a time
    (`attention_chunk_size`), so a device's scores stay O(S / context x chunk)."""
    mesh, axis = jax.sharding.get_abstract_mesh(), CONTEXT_AXIS
    n = context_size()
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    seq = jax.sharding.PartitionSpec(None, axis)
    has_sinks = sinks is not None
    sinks = jnp.zeros((q.shape[2],), jnp.float32) if sinks is None else sinks
    local = partial(_ring, spec=spec, n=n, has_sinks=has_sinks, chunk=chunk)
    return jax.shard_map(
        lambda q, k, v, pos, seg, sinks: local(q, k, v, pos, seg, sinks),
        mesh=mesh,
        in_specs=(seq, seq, seq, seq, seq, jax.sharding.PartitionSpec()),
        out_specs=seq,
        axis_names={axis},
        check_vma=False,
    )(q, k, v, positions, seg, sinks)


def _halves(s: int) -> int:
    return 2 if s % 2 == 0 else 1


def _half(a, i: int, parts: int):
    """The i-th of `parts` equal slices of a's sequence axis (axis 1)."""
    size = a.shape[1] // parts
    return jax.lax.slice_in_dim(a, i * size, (i + 1) * size, axis=1)


def _may_see(spec, q_pos, k_pos):
    """False only when the causal mask hides every key from every query (all keys later)."""
    return jnp.min(k_pos) <= jnp.max(q_pos) if spec.causal else jnp.bool_(True)


def _grouped(a, kh: int):
    """[B, S, H, D] -> [B, S, K, G, D]."""
    b, s, h, d = a.shape
    return a.reshape(b, s, kh, h // kh, d)


def _ring_shift(tree, n: int):
    return jax.lax.ppermute(tree, CONTEXT_AXIS, [(i, (i + 1) % n) for i in range(n)])


# ------------------------------------------------------------------------------------ forward
def _key_chunks(kb, chunk: int):
    """A key block (k, v, pos, seg) [B, T, ...] -> the same stacked [T / c, B, c, ...] in chunks of
    c = `chunk` keys (the whole block when `chunk` does not divide T)."""
    t = kb[0].shape[1]
    c = chunk if 0 < chunk < t and t % chunk == 0 else t
    return tuple(jnp.moveaxis(a.reshape(a.shape[0], t // c, c, *a.shape[2:]), 1, 0) for a in kb)


def _forward(q, k, v, pos, seg, sinks, spec, n, has_sinks, chunk):
    """(out [B,S,H,Dv] in q's dtype, lse [halves] x [B,K,G,S/halves])."""
    b, s, h, _ = q.shape
    kh, parts = k.shape[2], _halves(s)
    queries = [
        (_grouped(_half(q, i, parts), kh), _half(pos, i, parts), _half(seg, i, parts))
        for i in range(parts)
    ]

    def fold(carries, block):
        out = []
        for carry, (qg, qp, qs) in zip(carries, queries, strict=True):
            for j in range(parts):
                kb = tuple(_half(a, j, parts) for a in block)

                def step(carry, qg=qg, qp=qp, qs=qs, kb=kb):
                    def one(carry, kc):
                        return _online_softmax_step(carry, qg, qp, qs, *kc, None, spec), None

                    return jax.lax.scan(one, carry, _key_chunks(kb, chunk))[0]

                carry = jax.lax.cond(_may_see(spec, qp, kb[2]), step, lambda c: c, carry)
            out.append(carry)
        return out

    def hop(_, state):  # the next device's block arrives, then joins the softmax
        carries, block = state
        block = _ring_shift(block, n)
        return fold(carries, block), block

    init = _online_softmax_init(
        b, kh, h // kh, s // parts, v.shape[-1], sinks if has_sinks else None
    )
    block = (k, v, pos, seg)
    carries, _ = jax.lax.fori_loop(0, n - 1, hop, (fold([init] * parts, block), block))
    outs, lses = [], []
    for m, denom, acc in carries:
        seen = denom > 0
        outs.append(jnp.where(seen[..., None], acc / jnp.maximum(denom, 1e-30)[..., None], 0.0))
        lses.append(jnp.where(seen, m + jnp.log(jnp.maximum(denom, 1e-30)), NEG_INF))
    out = jnp.concatenate([jnp.einsum("bkgsd->bskgd", o) for o in outs], axis=1)
    return out.reshape(b, s, h, -1).astype(q.dtype), lses


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ring(q, k, v, pos, seg, sinks, spec, n, has_sinks, chunk):
    return _forward(q, k, v, pos, seg, sinks, spec, n, has_sinks, chunk)[0]


def _ring_fwd(q, k, v, pos, seg, sinks, spec, n, has_sinks, chunk):
    out, lses = _forward(q, k, v, pos, seg, sinks, spec, n, has_sinks, chunk)
    return out, (q, k, v, pos, seg, sinks, out, lses)


# ----------------------------------------------------------------------------------- backward
def _pair_grads(qg, qp, qs, lse, delta, dout, kb, spec):
    """One (query half, key half) pair: (dq [B,S,K,G,D], dk [B,T,K,D], dv [B,T,K,Dv]), float32,
    from the saved log-sum-exp (softmax probabilities recomputed, as flash attention does)."""
    kc, vc, pc, segc = kb
    raw = einsum_f32("bskgd,btkd->bkgst", qg, kc) * spec.scale
    cap = spec.logit_softcap
    sc = raw if cap is None else cap * jnp.tanh(raw / cap)  # as attention_ops._scores
    mask = _visible(qp, pc, qs, segc, None, spec)[:, None, None]
    p = jnp.where(mask, jnp.exp(sc - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgst,bskgd->btkd", p, dout)
    dp = jnp.einsum("bskgd,btkd->bkgst", dout, vc.astype(jnp.float32))
    ds = p * (dp - delta[..., None])
    if cap is not None:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2 = 1 - (sc / cap)^2
        ds = ds * (1.0 - (sc / cap) ** 2)
    ds = ds * spec.scale
    dq = jnp.einsum("bkgst,btkd->bskgd", ds, kc.astype(jnp.float32))
    dk = jnp.einsum("bkgst,bskgd->btkd", ds, qg.astype(jnp.float32))
    return dq, dk, dv


def _chunked_pair_grads(qg, qp, qs, lse, delta, dout, kb, spec, chunk):
    """`_pair_grads` over the key block `chunk` keys at a time: dq summed, dk / dv per chunk."""

    def one(dq, kc):
        gq, gk, gv = _pair_grads(qg, qp, qs, lse, delta, dout, kc, spec)
        return dq + gq, (gk, gv)

    chunks = _key_chunks(kb, chunk)
    dq, (dk, dv) = jax.lax.scan(one, jnp.zeros(qg.shape, jnp.float32), chunks)

    def whole(a):  # [T / c, B, c, ...] -> [B, T, ...]
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(a.shape[0], -1, *a.shape[3:])

    return dq, whole(dk), whole(dv)


def _ring_bwd(spec, n, has_sinks, chunk, res, dout):
    q, k, v, pos, seg, sinks, out, lses = res
    s, h = q.shape[1:3]
    kh, parts = k.shape[2], _halves(s)
    dout_g = _grouped(dout.astype(jnp.float32), kh)
    out_g = _grouped(out.astype(jnp.float32), kh)
    queries = []
    for i in range(parts):
        do = _half(dout_g, i, parts)
        delta = jnp.einsum("bskgd,bskgd->bkgs", do, _half(out_g, i, parts))
        queries.append((
            _grouped(_half(q, i, parts), kh), _half(pos, i, parts), _half(seg, i, parts),
            lses[i], delta, do,
        ))  # fmt: skip

    def fold(dqs, block):
        """Every pair's gradients: dq stays here, dk / dv travel with the block."""
        kv, grads = block[:4], list(block[4:])
        new_dqs = []
        for dq, (qg, qp, qs, lse, delta, do) in zip(dqs, queries, strict=True):
            for j in range(parts):
                kb = tuple(_half(a, j, parts) for a in kv)

                def step(acc, qg=qg, qp=qp, qs=qs, lse=lse, delta=delta, do=do, kb=kb):
                    gq, gk, gv = _chunked_pair_grads(qg, qp, qs, lse, delta, do, kb, spec, chunk)
                    return acc[0] + gq, acc[1] + gk, acc[2] + gv

                acc = (dq, _half(grads[0], j, parts), _half(grads[1], j, parts))
                dq, gk, gv = jax.lax.cond(_may_see(spec, qp, kb[2]), step, lambda a: a, acc)
                size = gk.shape[1]
                grads[0] = jax.lax.dynamic_update_slice_in_dim(grads[0], gk, j * size, axis=1)
                grads[1] = jax.lax.dynamic_update_slice_in_dim(grads[1], gv, j * size, axis=1)
            new_dqs.append(dq)
        return new_dqs, (*kv, *grads)

    def hop(_, state):
        dqs, block = state
        return fold(dqs, _ring_shift(block, n))

    zeros_kv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dqs = [jnp.zeros(qg.shape, jnp.float32) for qg, *_ in queries]
    dqs, block = fold(dqs, (k, v, pos, seg, *zeros_kv))
    dqs, block = jax.lax.fori_loop(0, n - 1, hop, (dqs, block))
    dk, dv = _ring_shift(block[4:], n)  # the last hop brings each block's dK / dV home
    dq = jnp.concatenate(dqs, axis=1).reshape(q.shape)
    if has_sinks:  # d loss / d sink = -sum over rows of p_sink * delta
        dsinks = jnp.zeros((kh, h // kh), jnp.float32)
        for _, _, _, lse, delta, _ in queries:
            sink = _sink_logits(sinks, kh, (*lse.shape, 1))[..., 0]
            dsinks -= jnp.sum(jnp.exp(sink - lse) * delta, axis=(0, 3))
        dsinks = dsinks.reshape(h).astype(sinks.dtype)
    else:
        dsinks = jnp.zeros_like(sinks)
    return (
        dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
        None, None, dsinks,
    )  # fmt: skip


_ring.defvjp(_ring_fwd, _ring_bwd)
