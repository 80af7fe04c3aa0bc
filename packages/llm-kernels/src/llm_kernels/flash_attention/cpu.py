"""The C++ XLA FFI flash attention (csrc/attention_kernels.cc) as forward/backward functions.

The kernels compute in float32; other dtypes are cast here. Under jax.vmap the FFI call
broadcasts all operands and the kernel folds the extra leading dims into the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llm_kernels.flash_attention.config import AttentionConfig, round_up

_FWD = "llm_kernels_attention_fwd"
_BWD = "llm_kernels_attention_bwd"


def _attrs(cfg: AttentionConfig, has_segments: bool) -> dict[str, object]:
    return {
        "causal": bool(cfg.causal),
        "window": np.int64(cfg.sliding_window or 0),
        "softcap": np.float32(cfg.logit_soft_cap or 0.0),
        "scale": np.float32(cfg.sm_scale),
        "has_segments": bool(has_segments),
        "block_q": np.int64(round_up(cfg.block_q, 16)),
        "block_k": np.int64(round_up(cfg.block_k, 16)),
    }


def _segments(q: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    if segment_ids is None:  # the FFI signature is fixed: pass a tiny unused placeholder
        dummy = jnp.zeros((q.shape[0], 1), jnp.int32)
        return dummy, dummy
    return segment_ids, segment_ids


def forward(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, cfg: AttentionConfig
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] float32)."""
    batch, q_len, heads, _ = q.shape
    f32 = jnp.float32
    q_seg, k_seg = _segments(q, segment_ids)
    out, lse = jax.ffi.ffi_call(
        _FWD,
        (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct((batch, heads, q_len), f32)),
        vmap_method="broadcast_all",
    )(q.astype(f32), k.astype(f32), v.astype(f32), q_seg, k_seg,
      **_attrs(cfg, segment_ids is not None))  # fmt: skip
    return out.astype(q.dtype), lse


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    cfg: AttentionConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (dq, dk, dv) in the dtypes of (q, k, v)."""
    f32 = jnp.float32
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(f32), dout.astype(f32))
    q_seg, k_seg = _segments(q, segment_ids)
    dq, dk, dv = jax.ffi.ffi_call(
        _BWD,
        (
            jax.ShapeDtypeStruct(q.shape, f32),
            jax.ShapeDtypeStruct(k.shape, f32),
            jax.ShapeDtypeStruct(v.shape, f32),
        ),
        vmap_method="broadcast_all",
    )(q.astype(f32), k.astype(f32), v.astype(f32), q_seg, k_seg, dout.astype(f32), lse, delta,
      **_attrs(cfg, segment_ids is not None))  # fmt: skip
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
