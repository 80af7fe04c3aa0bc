"""Public decode attention: `paged_attention` over paged pools and `decode_attention` over a
head-major contiguous cache. Validation and dispatch between the Mosaic Pallas kernel (paged; TPU,
or any platform with interpret=True), the C++ kernel (the CPU default for float32 and bfloat16
caches: each row reads only its own keys) and the jnp reference (elsewhere: gathers every row to the table width, masks)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm_kernels import _ffi
from llm_kernels._platform import current_platform
from llm_kernels.flash_attention.config import AttentionConfig
from llm_kernels.paged_attention.cpu import decode_attention_cpu, decode_attention_int8_cpu
from llm_kernels.paged_attention.pallas_tpu import paged_attention_kernel
from llm_kernels.paged_attention.reference import paged_attention_reference


def _validate(q, k_pages, v_pages, lengths, page_indices, sliding_window) -> None:
    shapes = (
        f"q.shape={tuple(q.shape)}, k_pages.shape={tuple(k_pages.shape)}, "
        f"v_pages.shape={tuple(v_pages.shape)}, lengths.shape={tuple(lengths.shape)}, "
        f"page_indices.shape={tuple(page_indices.shape)}"
    )
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "paged_attention: need q [batch, heads, head_dim] and k_pages == v_pages shape "
            f"[kv_heads, pages, page_size, head_dim]; got {shapes}"
        )
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"paged_attention: head_dim mismatch; got {shapes}")
    if q.shape[1] % k_pages.shape[0] != 0:
        raise ValueError(
            f"paged_attention: num_heads ({q.shape[1]}) must be divisible by num_kv_heads "
            f"({k_pages.shape[0]}); got {shapes}"
        )
    if (
        lengths.shape != (q.shape[0],)
        or page_indices.ndim != 2
        or page_indices.shape[0] != q.shape[0]
    ):
        raise ValueError(
            f"paged_attention: lengths must be [batch] and page_indices [batch, pages]; got {shapes}"
        )
    if lengths.dtype != jnp.int32 or page_indices.dtype != jnp.int32:
        raise ValueError(
            f"paged_attention: lengths and page_indices must be int32, got {lengths.dtype} and "
            f"{page_indices.dtype}"
        )
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"paged_attention: {name} must be floating, got {x.dtype}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(
            f"paged_attention: sliding_window must be a positive int or None, got {sliding_window!r}"
        )


BACKENDS = ("reference", "cpu")


FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
CACHE_DTYPES = (*FLOAT_DTYPES, jnp.dtype(jnp.int8))


def _cpu_backend(backend: str | None, op: str, q, k, v) -> bool:
    """Whether to run the C++ kernel: backend "cpu", or None on the CPU with a float32, bfloat16 or
    (scaled) int8 cache (k and v of one dtype) and a float32 or bfloat16 q."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected None or one of {BACKENDS}")
    supported = k.dtype == v.dtype and k.dtype in CACHE_DTYPES and q.dtype in FLOAT_DTYPES
    if backend == "cpu":
        _ffi.require_cpu_kernels(op)
        if not supported:
            raise ValueError(
                f"{op}(backend='cpu') takes a float32 or bfloat16 q and a float32, bfloat16 or "
                f"int8 cache (k and v alike), got q {q.dtype}, k {k.dtype}, v {v.dtype}"
            )
        return True
    return (
        backend is None
        and supported
        and current_platform() == "cpu"
        and _ffi.cpu_kernels_available()
    )


def _int8_cache(op: str, k, v, k_scale, v_scale) -> bool:
    """True for an int8 cache (checked: int8 k and v with scales of their shape, head_dim 1)."""
    if k.dtype != jnp.int8 and v.dtype != jnp.int8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"{op}: k_scale / v_scale are for int8 caches, got k {k.dtype}")
        return False
    want = (*k.shape[:-1], 1)
    shapes = [None if x is None else tuple(x.shape) for x in (k_scale, v_scale)]
    if k.dtype != v.dtype or shapes != [want, want]:
        raise ValueError(
            f"{op}: an int8 cache needs int8 k and v and k_scale, v_scale of shape {want}; got k "
            f"{k.dtype}, v {v.dtype}, k_scale.shape={shapes[0]}, v_scale.shape={shapes[1]}"
        )
    return True


def _dequantized(x, scale, dtype):
    return (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def _check_sinks(op: str, sinks, heads: int) -> None:
    if sinks is not None and (sinks.ndim != 1 or sinks.shape[0] != heads):
        raise ValueError(
            f"{op}: sinks must be [num_heads] = [{heads}], got sinks.shape={tuple(sinks.shape)}"
        )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    interpret: bool = False,
    sinks: jax.Array | None = None,
    backend: str | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """One decode step against a paged KV cache. q: [B, H, D] -> [B, H, D].

    Sequence b's keys are pages page_indices[b] of k_pages/v_pages, of which the first
    lengths[b] tokens are valid; the query sits at position lengths[b] - 1.
    sinks: [H] learned logits in every softmax (GPT-OSS), in the kernels and the jax.numpy path.
    backend: None (Pallas on TPU or with interpret=True; on the CPU the C++ kernel for float32,
    bfloat16 or int8 pools when compiled; else the reference), "cpu" or "reference".
    k_scale, v_scale: for int8 pools, float scales [Hkv, P, page_size, 1] (value = int8 * scale);
    the C++ kernel reads them in place, other backends dequantize the pools first.
    """
    int8 = _int8_cache("paged_attention", k_pages, v_pages, k_scale, v_scale)
    k_view, v_view = (
        [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (k_pages, v_pages)]
        if int8
        else (k_pages, v_pages)
    )
    _validate(q, k_view, v_view, lengths, page_indices, sliding_window)
    _check_sinks("paged_attention", sinks, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if int8:
        cpu = backend != "reference" and not (backend is None and interpret)
        if cpu and _cpu_backend(backend, "paged_attention", q, k_pages, v_pages):
            return decode_attention_int8_cpu(
                q, k_pages, v_pages, k_scale, v_scale, lengths, page_indices, sinks,
                False, scale, logit_soft_cap, sliding_window,
            )  # fmt: skip
        k_pages, v_pages = (
            _dequantized(k_pages, k_scale, q.dtype),
            _dequantized(v_pages, v_scale, q.dtype),
        )
    if backend is None and (interpret or current_platform() == "tpu"):
        cfg = AttentionConfig(
            causal=False,
            sliding_window=sliding_window,
            logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
            sm_scale=scale,
            block_q=q.shape[1] // k_pages.shape[0],
            block_k=k_pages.shape[2],
            interpret=interpret,
        )
        return paged_attention_kernel(q, k_pages, v_pages, lengths, page_indices, cfg, sinks)
    if _cpu_backend(backend, "paged_attention", q, k_pages, v_pages):
        return decode_attention_cpu(
            q, k_pages, v_pages, lengths, page_indices, sinks,
            False, scale, logit_soft_cap, sliding_window,
        )  # fmt: skip
    return paged_attention_reference(
        q, k_pages, v_pages, lengths, page_indices,
        sm_scale=scale, logit_soft_cap=logit_soft_cap, sliding_window=sliding_window, sinks=sinks,
    )  # fmt: skip


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    backend: str | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """One decode step over a head-major contiguous cache k, v [B, K, L, D] (key j at position
    j): q [B, H, D] sees row b's keys j < lengths[b] (and with a window, (lengths[b] - 1) - j <
    window) -> [B, H, D]. Rows with no visible key (and no sinks) give zeros.

    backend: None (the C++ kernel on the CPU for a float32 or bfloat16 cache when compiled: each
    row reads its own length only; else the reference, which masks the whole cache), "cpu" or
    "reference". k_scale, v_scale: for an int8 cache, float scales [B, K, L, 1].
    """
    int8 = _int8_cache("decode_attention", k, v, k_scale, v_scale)
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            "decode_attention: need q [batch, heads, head_dim] and k == v shape "
            f"[batch, kv_heads, length, head_dim]; got q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )
    table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
    k_view, v_view = (  # the [K, B, L, D] pool views of the shape checks
        jax.ShapeDtypeStruct((x.shape[1], x.shape[0], *x.shape[2:]), jnp.float32) for x in (k, v)
    )
    _validate(q, k_view, v_view, lengths, table, sliding_window)
    if k.shape[0] != q.shape[0]:
        raise ValueError(
            f"decode_attention: k batch {k.shape[0]} != q batch {q.shape[0]} (k.shape="
            f"{tuple(k.shape)}, q.shape={tuple(q.shape)})"
        )
    _check_sinks("decode_attention", sinks, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if int8:
        if backend != "reference" and _cpu_backend(backend, "decode_attention", q, k, v):
            return decode_attention_int8_cpu(
                q, k, v, k_scale, v_scale, lengths, None, sinks,
                True, scale, logit_soft_cap, sliding_window,
            )  # fmt: skip
        k, v = _dequantized(k, k_scale, q.dtype), _dequantized(v, v_scale, q.dtype)
    if _cpu_backend(backend, "decode_attention", q, k, v):
        return decode_attention_cpu(
            q, k, v, lengths, None, sinks, True, scale, logit_soft_cap, sliding_window
        )
    return paged_attention_reference(
        q, jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1), lengths, table,
        sm_scale=scale, logit_soft_cap=logit_soft_cap, sliding_window=sliding_window, sinks=sinks,
    )  # fmt: skip
