"""Target log-probs without the whole [batch, seq, vocab] logits: the head is applied to chunks of
the sequence inside a scan, each chunk under `jax.checkpoint`, so the forward keeps one chunk's
logits and the backward recomputes them chunk by chunk (`vocab_tiling_chunks`). Every loss of
llm-train (next-token cross-entropy with z-loss, DPO, GRPO) reads its log-probs from here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _target_stats(logits, targets):
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target - log_z, log_z


def target_logprobs(model, hidden, targets, chunks: int = 1, logits_fn=None):
    """hidden [B, S, E] (`model.hidden`), targets [B, S] -> (log p(target) [B, S], logsumexp of
    the logits [B, S]), float32. chunks > 1 splits S into that many pieces (S % chunks == 0).
    logits_fn: hidden -> logits (default `model.logits`; a multi-token-prediction depth's head)."""
    logits_fn = logits_fn or model.logits
    if chunks <= 1:
        return _target_stats(logits_fn(hidden), targets)
    b, s, e = hidden.shape
    c = s // chunks
    xs = hidden.reshape(b, chunks, c, e).swapaxes(0, 1)
    ts = targets.reshape(b, chunks, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(x, t):
        return _target_stats(logits_fn(x), t)

    def body(carry, inputs):
        return carry, one(*inputs)

    _, (logp, log_z) = jax.lax.scan(body, None, (xs, ts))
    return logp.swapaxes(0, 1).reshape(b, s), log_z.swapaxes(0, 1).reshape(b, s)
