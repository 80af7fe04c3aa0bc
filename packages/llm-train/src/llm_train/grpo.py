"""GRPO (Shao et al. 2024) and GSPO (Zheng et al. 2025) objectives, as pure functions.

Rows are completions: `num_generations` consecutive rows per prompt. Per-token arrays are [B, S]
with `mask` 1 on completion tokens (the targets the policy generated).

Advantages from the rewards r [P, G] of the G completions of each prompt:
- `grpo`: (r - mean) / (std + 1e-4) within the group;
- `rloo`: r - mean of the other G - 1 rewards (leave-one-out baseline);
- `drgrpo`: r - mean (Dr. GRPO: no division by the std).

Policy loss with ratio rho = exp(logp - old_logp), clipped to [1 - eps, 1 + eps_high]:
- `grpo`: per token -min(rho A, clip(rho) A), averaged over each completion's tokens, then over
  completions (the original GRPO normalisation);
- `gspo`: one ratio per completion, exp(mean over its tokens of logp - old_logp), clipped the same
  way, -min(s A, clip(s) A) averaged over completions.
KL to the reference (added with weight beta, averaged like the policy loss, skipped when beta is 0):
`kl` = logp - ref_logp (k1), `low_var_kl` = exp(ref - logp) - (ref - logp) - 1 (k3, Schulman).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def advantages(rewards: np.ndarray, kind: str) -> np.ndarray:
    """rewards [P, G] -> advantages [P, G] (see the module docstring)."""
    r = np.asarray(rewards, np.float64)
    g = r.shape[1]
    mean = r.mean(axis=1, keepdims=True)
    if kind == "grpo":
        out = (r - mean) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    elif kind == "rloo":
        out = r - (r.sum(axis=1, keepdims=True) - r) / (g - 1)
    elif kind == "drgrpo":
        out = r - mean
    else:
        raise ValueError(f"grpo_advantage={kind!r}: expected grpo, rloo or drgrpo")
    return out.astype(np.float32)


def _per_sequence_mean(x, mask):
    return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def policy_loss(logp, old_logp, ref_logp, adv, mask, *, algo, eps, eps_high, beta, kl_estimator):
    """(loss summed over completions, statistics summed over completions: kl, clip_fraction).
    Callers divide by the number of completions."""
    hi = eps if eps_high is None else eps_high
    if algo == "grpo":
        ratio = jnp.exp(logp - old_logp)
        clipped = jnp.clip(ratio, 1.0 - eps, 1.0 + hi)
        a = adv[:, None]
        per_token = -jnp.minimum(ratio * a, clipped * a)
        per_seq = _per_sequence_mean(per_token, mask)
        clip_frac = _per_sequence_mean((ratio != clipped).astype(jnp.float32), mask)
    elif algo == "gspo":
        s = jnp.exp(_per_sequence_mean(logp - old_logp, mask))
        clipped = jnp.clip(s, 1.0 - eps, 1.0 + hi)
        per_seq = -jnp.minimum(s * adv, clipped * adv)
        clip_frac = (s != clipped).astype(jnp.float32)
    else:
        raise ValueError(f"grpo_loss_algo={algo!r}: expected grpo or gspo")
    delta = ref_logp - logp
    if kl_estimator == "kl":
        kl_tok = -delta
    elif kl_estimator == "low_var_kl":
        kl_tok = jnp.exp(delta) - delta - 1.0
    else:
        raise ValueError(f"grpo_kl_estimator={kl_estimator!r}: expected kl or low_var_kl")
    kl = _per_sequence_mean(kl_tok, mask)
    if beta:
        per_seq = per_seq + beta * kl
    stats = {"grpo_kl": jnp.sum(kl), "grpo_clip_fraction": jnp.sum(clip_frac)}
    return jnp.sum(per_seq), stats
