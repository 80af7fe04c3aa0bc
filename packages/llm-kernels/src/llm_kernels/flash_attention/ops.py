"""Public flash_attention: argument checks, backend dispatch and custom_vjp wiring.

Every kernel backend provides ``forward(q, k, v, segment_ids, cfg) -> (out, lse)`` and
``backward(q, k, v, segment_ids, out, lse, dout, cfg) -> (dq, dk, dv)``; the custom_vjp here
saves (q, k, v, segment_ids, out, lse) and calls the backend's own backward kernel.

Attention sinks (GPT-OSS: a learned logit per head in every softmax, attending to nothing) need no
kernel change. With the kernel's row statistics lse = log sum_j exp(s_j), the sink's softmax is
lse' = logaddexp(lse, sink) and out' = out * exp(lse - lse'). Its backward is the kernels' own
backward run with (out', lse') in place of (out, lse): they recompute p_j = exp(s_j - lse'), the
sink-softmax probabilities, and delta = rowsum(dout * out'), which is that softmax's delta because
the sink carries no value. The sink's gradient is -sum over rows of exp(sink - lse') * delta.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import jax
import jax.numpy as jnp

from llm_kernels import _platform
from llm_kernels.flash_attention import cpu, pallas_gpu, pallas_tpu
from llm_kernels.flash_attention.config import DEFAULT_BLOCKS, AttentionConfig, pick_block
from llm_kernels.flash_attention.reference import mha_reference
from llm_kernels.flash_attention.validation import validate_attention_args

_KERNELS: dict[str, ModuleType] = {"cpu": cpu, "pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}

# The C++ kernel is the CPU default because benchmarks/kernels.py shows it beating XLA's
# compiled reference on CPU (numbers in docs/llm-kernels.md); interpret=True without a backend runs
# the TPU (Mosaic-style, BlockSpec grid) kernel. Both choices live in `_platform.resolve_backend`.


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """The backend to run, or a loud error when the platform has none."""
    return _platform.resolve_backend(
        "flash_attention", backend, interpret, "the jax.numpy implementation"
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segment_ids, cfg: AttentionConfig, backend: str):
    return _KERNELS[backend].forward(q, k, v, segment_ids, cfg)[0]


def _flash_fwd(q, k, v, segment_ids, cfg, backend):
    out, lse = _KERNELS[backend].forward(q, k, v, segment_ids, cfg)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(cfg, backend, res, dout):
    q, k, v, segment_ids, out, lse = res
    dq, dk, dv = _KERNELS[backend].backward(q, k, v, segment_ids, out, lse, dout, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _with_sinks(out, lse, sinks):
    """(out', lse') of the softmax with a sink logit per head; lse [B, H, Lq], sinks [H]."""
    sink = sinks.astype(jnp.float32)[None, :, None]
    lse_sink = jnp.logaddexp(lse, sink)
    keep = jnp.exp(lse - lse_sink)  # 0 where a row sees no key (lse = -inf)
    out = (out.astype(jnp.float32) * jnp.swapaxes(keep, 1, 2)[..., None]).astype(out.dtype)
    return out, lse_sink


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash_sinks(q, k, v, sinks, segment_ids, cfg: AttentionConfig, backend: str):
    out, lse = _KERNELS[backend].forward(q, k, v, segment_ids, cfg)
    return _with_sinks(out, lse, sinks)[0]


def _flash_sinks_fwd(q, k, v, sinks, segment_ids, cfg, backend):
    out, lse = _with_sinks(*_KERNELS[backend].forward(q, k, v, segment_ids, cfg), sinks)
    return out, (q, k, v, sinks, segment_ids, out, lse)


def _flash_sinks_bwd(cfg, backend, res, dout):
    q, k, v, sinks, segment_ids, out, lse = res
    dq, dk, dv = _KERNELS[backend].backward(q, k, v, segment_ids, out, lse, dout, cfg)
    delta = jnp.einsum(
        "bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32)
    )  # [B, H, Lq]
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
    return dq, dk, dv, dsinks, None


_flash_sinks.defvjp(_flash_sinks_fwd, _flash_sinks_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Memory-efficient attention. q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D] -> [B, Lq, H, D].

    See docs/llm-kernels.md for the masking semantics (aligned-end causal, Mistral-style sliding
    window, packed segments, Gemma-2 soft-cap) and the backends. sinks: [H] learned logits, one
    extra softmax column per head that attends to nothing (GPT-OSS); differentiable.
    """
    validate_attention_args(
        q, k, v,
        sliding_window=sliding_window, segment_ids=segment_ids, logit_soft_cap=logit_soft_cap,
        sm_scale=sm_scale, block_q=block_q, block_k=block_k, backend=backend, sinks=sinks,
    )  # fmt: skip
    chosen = resolve_backend(backend, interpret)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if chosen == "reference":
        return mha_reference(
            q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
            logit_soft_cap=logit_soft_cap, sm_scale=scale, sinks=sinks,
        )  # fmt: skip
    default_q, default_k = DEFAULT_BLOCKS[chosen]
    gpu = chosen == "pallas_gpu"
    cfg = AttentionConfig(
        causal=bool(causal),
        sliding_window=None if sliding_window is None else int(sliding_window),
        logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
        sm_scale=scale,
        block_q=pick_block(
            None if block_q is None else int(block_q), default_q, q.shape[1], power_of_two=gpu
        ),
        block_k=pick_block(
            None if block_k is None else int(block_k), default_k, k.shape[1], power_of_two=gpu
        ),
        interpret=interpret,
    )
    if sinks is not None:
        return _flash_sinks(q, k, v, sinks, segment_ids, cfg, chosen)
    return _flash(q, k, v, segment_ids, cfg, chosen)
