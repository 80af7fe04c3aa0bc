"""Flash attention for TPU: Mosaic Pallas kernels driven by BlockSpecs over a 4-D grid.

Forward grid (batch, head, q_block, k_block): the k_block axis is the sequential reduction,
with the running max / sum / accumulator in VMEM scratch. Backward: a dq kernel with the same
grid, and a dk/dv kernel over (batch, kv_head, k_block, group * q_block) whose last axis walks
every query block of every query head sharing the kv head (GQA without repeating K/V).
Blocks that the causal / sliding-window mask hides entirely are skipped with pl.when.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm_kernels.flash_attention import _block
from llm_kernels.flash_attention.config import AttentionConfig, round_up

F32 = jnp.float32


def _iota(shape: tuple[int, int], axis: int, start) -> jax.Array:
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _split(refs, has_seg: bool, n_in: int):
    """(inputs, q_seg_ref, k_seg_ref, rest) from the flat ref list of a kernel."""
    ins = refs[:n_in]
    if has_seg:
        return ins, refs[n_in], refs[n_in + 1], refs[n_in + 2 :]
    return ins, None, None, refs[n_in:]


def _seg_arrays(segment_ids, lq_pad: int, lk_pad: int):
    """q segments as [B, Lq_pad, 1] columns, kv segments as [B, 1, Lk_pad] rows."""
    qs = _block.pad_seq(segment_ids, 1, lq_pad, -1)[:, :, None]
    ks = _block.pad_seq(segment_ids, 1, lk_pad, -2)[:, None, :]
    return qs, ks


def _fwd_kernel(*refs, cfg: AttentionConfig, q_len: int, kv_len: int, has_seg: bool, nk: int):
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split(
        refs, has_seg, 3
    )
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    @pl.when(_block.block_visible(i * bq, bq, j * bk, bk, cfg, q_len, kv_len))
    def _body():
        s = _block.scores(q_ref[...], k_ref[...], cfg)
        visible = _block.mask(
            _iota((bq, 1), 0, i * bq), _iota((1, bk), 1, j * bk),
            qs_ref[...] if has_seg else None, ks_ref[...] if has_seg else None,
            cfg, q_len, kv_len,
        )  # fmt: skip
        m, denom, acc = _block.online_softmax_step(
            s, visible, m_scr[...], l_scr[...], acc_scr[...], v_ref[...]
        )
        m_scr[...], l_scr[...], acc_scr[...] = m, denom, acc

    @pl.when(j == nk - 1)
    def _finish():
        out, lse = _block.finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _params(n_parallel: int) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def forward(q, k, v, segment_ids, cfg: AttentionConfig):
    """(out [B, Lq, H, D], lse [B, H, Lq]) via the Mosaic forward kernel."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group, bq, bk = heads // kv_heads, cfg.block_q, cfg.block_k
    lq_pad, lk_pad = round_up(q_len, bq), round_up(kv_len, bk)
    nq, nk = lq_pad // bq, lk_pad // bk
    has_seg = segment_ids is not None
    args = [_block.to_heads_major(x, n) for x, n in ((q, lq_pad), (k, lk_pad), (v, lk_pad))]
    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda b, h, i, j: (b, h // group, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    if has_seg:
        args += _seg_arrays(segment_ids, lq_pad, lk_pad)
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, j)),
        ]
    kernel = functools.partial(
        _fwd_kernel, cfg=cfg, q_len=q_len, kv_len=kv_len, has_seg=has_seg, nk=nk
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(batch, heads, nq, nk),
            in_specs=in_specs,
            out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))],
            scratch_shapes=[
                pltpu.VMEM((bq, 1), F32),
                pltpu.VMEM((bq, 1), F32),
                pltpu.VMEM((bq, dim), F32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, lq_pad, dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, lq_pad, 1), F32),
        ],
        compiler_params=_params(3),
        interpret=cfg.interpret,
    )(*args)
    return _block.from_heads_major(out, q_len), lse[:, :, :q_len, 0]


def _dq_kernel(*refs, cfg: AttentionConfig, q_len: int, kv_len: int, has_seg: bool, nk: int):
    ins, qs_ref, ks_ref, (dq_ref, dq_scr) = _split(refs, has_seg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    @pl.when(_block.block_visible(i * bq, bq, j * bk, bk, cfg, q_len, kv_len))
    def _body():
        visible = _block.mask(
            _iota((bq, 1), 0, i * bq), _iota((1, bk), 1, j * bk),
            qs_ref[...] if has_seg else None, ks_ref[...] if has_seg else None,
            cfg, q_len, kv_len,
        )  # fmt: skip
        k = k_ref[...]
        _, ds = _block.backward_block(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], visible, cfg
        )
        dq_scr[...] += _block.dot_nn(ds.astype(k.dtype), k)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkdv_kernel(
    *refs, cfg: AttentionConfig, q_len: int, kv_len: int, has_seg: bool, nq: int, group: int
):
    ins, qs_ref, ks_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _split(refs, has_seg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    j, t = pl.program_id(2), pl.program_id(3)
    i = t % nq

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when(_block.block_visible(i * bq, bq, j * bk, bk, cfg, q_len, kv_len))
    def _body():
        visible = _block.mask(
            _iota((bq, 1), 0, i * bq), _iota((1, bk), 1, j * bk),
            qs_ref[...] if has_seg else None, ks_ref[...] if has_seg else None,
            cfg, q_len, kv_len,
        )  # fmt: skip
        q, do = q_ref[...], do_ref[...]
        p, ds = _block.backward_block(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], visible, cfg
        )
        dv_scr[...] += _block.dot_tn(p.astype(do.dtype), do)
        dk_scr[...] += _block.dot_tn(ds.astype(q.dtype), q)

    @pl.when(t == group * nq - 1)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, out, lse, dout, cfg: AttentionConfig):
    """(dq, dk, dv) via the Mosaic dq and dk/dv kernels."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group, bq, bk = heads // kv_heads, cfg.block_q, cfg.block_k
    lq_pad, lk_pad = round_up(q_len, bq), round_up(kv_len, bk)
    nq, nk = lq_pad // bq, lk_pad // bk
    has_seg = segment_ids is not None
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(F32), dout.astype(F32))
    rows = [_block.pad_seq(x, 2, lq_pad)[..., None] for x in (lse, delta)]
    qh, doh = _block.to_heads_major(q, lq_pad), _block.to_heads_major(dout, lq_pad)
    kh, vh = _block.to_heads_major(k, lk_pad), _block.to_heads_major(v, lk_pad)
    segs = list(_seg_arrays(segment_ids, lq_pad, lk_pad)) if has_seg else []
    static = {"cfg": cfg, "q_len": q_len, "kv_len": kv_len, "has_seg": has_seg}

    # dq: grid (b, h, i, j), reduction over key blocks j.
    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda b, h, i, j: (b, h // group, j, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    seg_specs = [
        pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, j)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nk=nk, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(batch, heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
            + (seg_specs if has_seg else []),
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, dim), F32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_params(3),
        interpret=cfg.interpret,
    )(qh, kh, vh, doh, *rows, *segs)

    # dk, dv: grid (b, kv_head, j, t) with t = g * nq + i over the group's query heads.
    def qmap(b, hk, j, t):
        return (b, hk * group + t // nq, t % nq, 0)

    q_spec2 = pl.BlockSpec((None, None, bq, dim), qmap)
    row_spec2 = pl.BlockSpec((None, None, bq, 1), qmap)
    kv_spec2 = pl.BlockSpec((None, None, bk, dim), lambda b, hk, j, t: (b, hk, j, 0))
    seg_specs2 = [
        pl.BlockSpec((None, bq, 1), lambda b, hk, j, t: (b, t % nq, 0)),
        pl.BlockSpec((None, 1, bk), lambda b, hk, j, t: (b, 0, j)),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, nq=nq, group=group, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(batch, kv_heads, nk, group * nq),
            in_specs=[q_spec2, kv_spec2, kv_spec2, q_spec2, row_spec2, row_spec2]
            + (seg_specs2 if has_seg else []),
            out_specs=[kv_spec2, kv_spec2],
            scratch_shapes=[pltpu.VMEM((bk, dim), F32), pltpu.VMEM((bk, dim), F32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(kh.shape, k.dtype),
            jax.ShapeDtypeStruct(vh.shape, v.dtype),
        ],
        compiler_params=_params(3),
        interpret=cfg.interpret,
    )(qh, kh, vh, doh, *rows, *segs)
    return (
        _block.from_heads_major(dq, q_len),
        _block.from_heads_major(dk, kv_len),
        _block.from_heads_major(dv, kv_len),
    )
