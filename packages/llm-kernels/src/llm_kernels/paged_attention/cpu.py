"""The C++ decode attention (csrc/paged_attention_kernels.cc) under `jax.ffi.ffi_call`.

Each (row, kv head) reads only its own keys, [max(0, length - window), length), in place: from the
pages its table names (paged pools) or from its row of a head-major contiguous cache. The cache is
float32, bfloat16 or int8 with per-token scales (widened in registers); q is computed in float32 and the output returned in
q's dtype. The kernel is a forward; gradients (never needed by a decode step, kept for honesty) come
from the jax.numpy reference, so the op is differentiable like every other kernel here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_kernels.paged_attention.reference import paged_attention_reference

TARGETS = {"float32": "", "bfloat16": "_bf16", "int8": "_int8"}


def _call(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window, scales=None):
    has_sinks = sinks is not None
    table = jnp.zeros((q.shape[0], 1), jnp.int32) if table is None else table
    none = jnp.zeros((1,), jnp.float32)
    k_scale, v_scale = scales if scales is not None else (none, none)
    target = "llm_kernels_paged_decode_attention" + TARGETS[jnp.dtype(k.dtype).name]
    out = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )(
        q.astype(jnp.float32), k, v, lengths, table,
        sinks.astype(jnp.float32) if has_sinks else none,
        k_scale.astype(jnp.float32), v_scale.astype(jnp.float32),
        contiguous=contiguous, window=np.int64(window or 0), softcap=np.float32(softcap or 0.0),
        scale=np.float32(scale), has_sinks=has_sinks,
    )  # fmt: skip
    return out.astype(q.dtype)


def decode_attention_int8_cpu(
    q, k, v, k_scale, v_scale, lengths, table, sinks, contiguous, scale, softcap, window
):
    """The kernel on an int8 cache (k, v int8; scales float32 of their shape with head_dim 1),
    dequantized in registers. Forward only: an int8 cache is never differentiated."""
    return _call(
        q, k, v, lengths, table, sinks, contiguous, scale, softcap, window, (k_scale, v_scale)
    )


def _as_pages(k):
    """Contiguous [B, K, L, D] as pools [K, B, L, D] with one page per row (the reference's view)."""
    return jnp.swapaxes(k, 0, 1)


def _reference(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window):
    if contiguous:
        k, v = _as_pages(k), _as_pages(v)
        table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
    return paged_attention_reference(
        q, k, v, lengths, table,
        sm_scale=scale, logit_soft_cap=softcap, sliding_window=window, sinks=sinks,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def decode_attention_cpu(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window):
    """q [B, H, D]; k, v (float32 or bfloat16) pools [K, P, ps, D] with table [B, n], or
    contiguous [B, K, L, D] with table None -> [B, H, D] in q's dtype."""
    return _call(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window)


def _fwd(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window):
    out = _call(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window)
    return out, (q, k, v, lengths, table, sinks)


def _bwd(contiguous, scale, softcap, window, res, dout):
    q, k, v, lengths, table, sinks = res

    def ref(q, k, v, sinks):
        return _reference(q, k, v, lengths, table, sinks, contiguous, scale, softcap, window)

    _, vjp = jax.vjp(ref, q, k, v, sinks)
    dq, dk, dv, dsinks = vjp(dout)
    return dq, dk, dv, None, None, dsinks


decode_attention_cpu.defvjp(_fwd, _bwd)
