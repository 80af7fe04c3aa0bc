"""Attention backends behind one function. All share one masking rule:

key j is visible to query i iff kv_pos[j] <= q_pos[i] (causal), q_pos[i] - kv_pos[j] < window (local
layers), both positions lie in the same aligned chunk of `chunk` positions (Llama 4's chunked
attention), the segment ids match (packed sequences) and the key is valid. A query that sees no key
returns zeros. Softmax runs in float32; GQA never materialises repeated K/V heads. `sinks` [H]
(GPT-OSS) add one learned logit per head to every softmax row, attending to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

NEG_INF = -1e30
CONTEXT_AXIS = "context"  # the mesh axis context parallelism splits the sequence over


@dataclass(frozen=True)
class AttentionSpec:
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None
    causal: bool = True
    chunk: int | None = None  # attend only within aligned chunks of this many positions
    context_strategy: str = "all_gather"  # context parallelism: all_gather or ring


def _visible(q_pos, kv_pos, q_seg, kv_seg, kv_valid, spec: AttentionSpec):
    """Boolean [B, S, T] mask."""
    qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
    mask = jnp.ones(qp.shape[:2] + kp.shape[2:], bool)
    if spec.causal:
        mask &= kp <= qp
    if spec.sliding_window is not None:
        mask &= qp - kp < spec.sliding_window
    if spec.chunk is not None:
        mask &= qp // spec.chunk == kp // spec.chunk
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


def einsum_f32(subscripts: str, a, b):
    """A float32-accumulating einsum. XLA:CPU has no kernel for some batched bf16 x bf16 -> f32
    dots (they fail at run time, "Unsupported element type for DotThunk": a bfloat16 model's
    prompt over its head-major cache did), so on the CPU narrower operands are widened first."""
    if jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _scores(q, k, spec: AttentionSpec, subscripts: str = "bskgd,btkd->bkgst"):
    """q [B,S,K,G,D], k [B,T,K,D] (or head-major, as `subscripts` say) -> float32 scores
    [B,K,G,S,T] with softcap applied."""
    s = einsum_f32(subscripts, q, k) * spec.scale
    if spec.logit_softcap is not None:
        s = spec.logit_softcap * jnp.tanh(s / spec.logit_softcap)
    return s


def _sink_logits(sinks, kh: int, shape):
    """sinks [H] -> float32 [B, K, G, S, 1] for scores [B, K, G, S, T]."""
    return jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kh, -1, 1, 1), (*shape[:-1], 1))


def _masked_probs(scores, mask, sinks, kh: int):
    """Softmax of float32 scores [B, K, G, S, T] over the visible keys (mask broadcast to them);
    sinks [H] join each row's softmax, then are dropped; rows that see no key get zeros."""
    probs = _softmax_visible(scores, mask, sinks, kh)
    return jnp.where(mask.any(-1, keepdims=True), probs, 0.0)


def _softmax_visible(scores, mask, sinks, kh: int):
    """`_masked_probs` without zeroing the rows that see no key (callers zero their outputs)."""
    scores = jnp.where(mask, scores, NEG_INF)
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = _sink_logits(sinks, kh, scores.shape)  # the sink column joins, then is dropped
    return jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1]


def dot_product_attention(
    q, k, v, q_pos, kv_pos, spec, q_seg=None, kv_seg=None, kv_valid=None, sinks=None
):
    """Reference backend. q [B,S,H,D]; k, v [B,T,K,D] -> [B,S,H,D]."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    # head-major operands ([B, K, ...]: batch dims lead, as XLA:CPU's matmuls take them without
    # transposing the [S, T] probabilities; bench-small's step: 5% faster)
    qh = q.reshape(b, s, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, S, D]
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    scores = _scores(qh, keys, spec, "bkgsd,bktd->bkgst")
    mask = _visible(q_pos, kv_pos, q_seg, kv_seg, kv_valid, spec)[:, None, None]
    probs = _softmax_visible(scores, mask, sinks, kh)
    out = einsum_f32("bkgst,bktd->bkgsd", probs.astype(v.dtype), values)
    out = jnp.where(mask.any(-1, keepdims=True), out, 0.0)  # rows that see no key: zeros
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, v.shape[-1]).astype(q.dtype)


def decode_kernel_applies(q, spec, cache_dtype) -> bool:
    """Whether a decode step runs llm-kernels' C++ decode attention: on the CPU with the compiled
    kernels, a float32 or bfloat16 q, a float32, bfloat16 or (scaled) int8 cache, causal, no chunk
    mask (the kernel reads keys [window start, q_pos] of each row in place, so a row pays for its
    own length, not the cache's)."""
    if not (spec.causal and spec.chunk is None and jax.default_backend() == "cpu"):
        return False
    floats = (jnp.float32, jnp.bfloat16)
    if q.dtype not in floats or cache_dtype not in (*floats, jnp.int8):
        return False
    import llm_kernels

    return llm_kernels.cpu_kernels_available()


def decode_attention(q, k, v, q_pos, spec, sinks=None, use_kernel: bool | None = None):
    """One new token per row over a head-major cache: q [B,1,H,D], k, v [B,K,T,D] with key j at
    position j -> [B,1,H,D]. Same masking rule as the other backends (keys past q_pos are masked,
    so unwritten cache positions never count).

    use_kernel None: llm-kernels' C++ decode attention where `decode_kernel_applies` (each row reads
    only its keys up to q_pos). Otherwise XLA: the matmuls keep (batch, kv head) as leading batch
    dimensions of every operand, which XLA:CPU runs without copying the cache (the token-major
    einsums of `dot_product_attention` made it transpose the whole cache every layer and step), but
    every row attends over all T positions, masked."""
    if use_kernel is None:
        use_kernel = k.dtype == v.dtype != jnp.int8 and decode_kernel_applies(q, spec, k.dtype)
    if use_kernel:
        import llm_kernels

        out = llm_kernels.decode_attention(
            q[:, 0], k, v, (q_pos[:, 0] + 1).astype(jnp.int32),
            sm_scale=spec.scale, logit_soft_cap=spec.logit_softcap,
            sliding_window=spec.sliding_window, sinks=sinks, backend="cpu",
        )  # fmt: skip
        return out[:, None]
    b, _, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, d)
    s = einsum_f32("bkgd,bktd->bkgt", qg, k) * spec.scale
    if spec.logit_softcap is not None:
        s = spec.logit_softcap * jnp.tanh(s / spec.logit_softcap)
    kv_pos = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), (b, k.shape[2]))
    mask = _visible(q_pos, kv_pos, None, None, None, spec)[:, None, None]  # [B, 1, 1, 1, T]
    probs = _masked_probs(s[:, :, :, None], mask, sinks, kh)[:, :, :, 0]
    out = einsum_f32("bkgt,bktd->bkgd", probs.astype(v.dtype), v)
    return out.reshape(b, 1, h, v.shape[-1]).astype(q.dtype)


def chunked_attention(
    q, k, v, q_pos, kv_pos, spec, q_seg=None, kv_seg=None, kv_valid=None, chunk=512, sinks=None
):
    """Memory-efficient backend in plain JAX: online softmax over key chunks (O(S * chunk) memory)."""
    b, s, h, d = q.shape
    t, kh = k.shape[1], k.shape[2]
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        kv_pos = jnp.pad(kv_pos, ((0, 0), (0, pad)))
        valid = jnp.ones((b, t), bool) if kv_valid is None else kv_valid
        kv_valid = jnp.pad(valid, ((0, 0), (0, pad)))
        if kv_seg is not None:
            kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    n = k.shape[1] // chunk

    def split(x):
        return None if x is None else jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    qg = q.reshape(b, s, kh, h // kh, d)

    def step(carry, xs):
        return _online_softmax_step(carry, qg, q_pos, q_seg, *xs, spec), None

    init = _online_softmax_init(b, kh, h // kh, s, v.shape[-1], sinks)
    xs = (split(k), split(v), split(kv_pos), split(kv_seg), split(kv_valid))
    carry, _ = jax.lax.scan(step, init, xs)
    return _online_softmax_out(carry, q.dtype)


def _online_softmax_init(b, kh, g, s, dv, sinks):
    """(running max, denominator, accumulator) before any key block; a sink starts the softmax
    (max = sink, denominator = 1)."""
    init = (
        jnp.full((b, kh, g, s), NEG_INF, jnp.float32),
        jnp.zeros((b, kh, g, s), jnp.float32),
        jnp.zeros((b, kh, g, s, dv), jnp.float32),
    )
    if sinks is not None:
        sink = _sink_logits(sinks, kh, (b, kh, g, s, 1))[..., 0]
        init = (sink, jnp.ones_like(sink), init[2])
    return init


def _online_softmax_step(carry, qg, q_pos, q_seg, kc, vc, pc, segc, validc, spec):
    """Fold one block of keys / values into the running softmax of queries qg [B,S,K,G,D]."""
    m, denom, acc = carry
    sc = _scores(qg, kc, spec)
    mask = _visible(q_pos, pc, q_seg, segc, validc, spec)[:, None, None]
    sc = jnp.where(mask, sc, NEG_INF)
    m_new = jnp.maximum(m, sc.max(-1))
    p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    denom = denom * corr + p.sum(-1)
    acc = acc * corr[..., None] + einsum_f32("bkgst,btkd->bkgsd", p.astype(vc.dtype), vc)
    return m_new, denom, acc


def _online_softmax_out(carry, dtype):
    """[B,S,H,Dv] from the running softmax (rows that saw no key: zeros)."""
    _, denom, acc = carry
    b, kh, g, s, dv = acc.shape
    out = jnp.where(denom[..., None] > 0, acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)
    return jnp.einsum("bkgsd->bskgd", out).reshape(b, s, kh * g, dv).astype(dtype)


def flash_attention(q, k, v, spec, segment_ids=None, sinks=None):
    """The llm-kernels flash kernel (index-based causal masking: training / full-prefix path)."""
    try:
        import llm_kernels
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "attention_backend=flash needs the llm-kernels package: pip install packages/llm-kernels"
        ) from err
    return llm_kernels.flash_attention(
        q,
        k,
        v,
        causal=spec.causal,
        sliding_window=spec.sliding_window,
        segment_ids=segment_ids,
        logit_soft_cap=spec.logit_softcap,
        sm_scale=spec.scale,
        sinks=sinks,
    )


CHUNKS_PER_SEGMENT = 1 << 16


def chunk_segments(positions, segment_ids, chunk: int):
    """Segment ids under which "same segment" means "same packed sequence and same attention
    chunk" (Llama 4's chunked attention: query and key positions in the same `chunk`-wide block).
    Exact because positions count from 0 within each packed sequence (the training path)."""
    segment_ids = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    return segment_ids.astype(jnp.int32) * CHUNKS_PER_SEGMENT + positions // chunk


def self_attention(q, k, v, positions, segment_ids, spec, backend: str, chunk: int, sinks=None):
    """Attention of a sequence over itself with the configured backend. q, k [B,S,*,Dqk], v
    [B,S,K,Dv]: the flash kernels need one head dim, so a narrower side is zero-padded (which leaves
    scores and values unchanged) and the output cut back to Dv."""
    if backend == "flash":
        dqk, dv = q.shape[-1], v.shape[-1]
        width = max(dqk, dv)

        def pad(x):
            return (
                x
                if x.shape[-1] == width
                else jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))
            )

        if spec.chunk is not None:  # the flash kernels mask by segment: one per (sequence, chunk)
            segment_ids = chunk_segments(positions, segment_ids, spec.chunk)
        return flash_attention(pad(q), pad(k), pad(v), spec, segment_ids, sinks)[..., :dv]
    if spec.context_strategy == "ring" and context_size() > 1:
        from llm_core.layers.ring_attention import ring_attention

        return ring_attention(q, k, v, positions, segment_ids, spec, sinks, chunk)
    k, v, k_pos, k_seg = gathered_over_context(k, v, positions, segment_ids)
    if backend == "chunked":
        return chunked_attention(
            q, k, v, positions, k_pos, spec, segment_ids, k_seg, chunk=chunk, sinks=sinks
        )
    return dot_product_attention(q, k, v, positions, k_pos, spec, segment_ids, k_seg, sinks=sinks)


def context_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(CONTEXT_AXIS, 1)


def gathered_over_context(*arrays):
    """Context parallelism (`context_parallel_strategy: all_gather`): under a mesh whose `context`
    axis is > 1 the sequence axis (axis 1) of K, V and their positions / segment ids is gathered
    across it, while the queries keep their own slice of the sequence; the masks use the gathered
    positions, so they stay exact. Other axes are left to the partitioner. Without such a mesh:
    unchanged."""
    if context_size() == 1:
        return arrays
    mesh = jax.sharding.get_abstract_mesh()
    free = jax.sharding.PartitionSpec.UNCONSTRAINED

    def gather(a):
        if a is None:
            return None
        spec = jax.sharding.PartitionSpec(free, None, *([free] * (a.ndim - 2)))
        return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, spec))

    return tuple(gather(a) for a in arrays)


def load_balanced_order(seq_len: int, parts: int):
    """Causal load balance for context parallelism: the permutation of [0, seq_len) whose i-th of
    `parts` contiguous slices holds chunks i and 2 * parts - 1 - i of 2 * parts, so every device
    has as many early as late queries. None for one part, or a length that does not cut into
    2 * parts chunks (left in order: correct, just not balanced)."""
    import numpy as np

    if parts <= 1 or seq_len % (2 * parts):
        return None
    c = seq_len // (2 * parts)
    chunks = [(i, 2 * parts - 1 - i) for i in range(parts)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for pair in chunks for j in pair])
