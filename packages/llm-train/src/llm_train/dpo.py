"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023) losses.

A DPO batch holds pairs: row 2i is prompt + chosen response, row 2i + 1 prompt + rejected response,
with loss weights on the response tokens only. The policy and a frozen reference score each row by
the summed log-probability of its response tokens; with h = (policy_chosen - ref_chosen) -
(policy_rejected - ref_rejected):
- `sigmoid` (DPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps:
  `dpo_label_smoothing`, the conservative DPO of Mitchell 2023);
- `ipo`: (h' - 1 / (2 beta))^2 with h' built from length-normalised log-probs, as TRL does.
Rewards are beta * (policy - reference) log-probs of each response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpo_loss(policy, reference, lengths, *, beta: float, label_smoothing: float, kind: str):
    """policy, reference, lengths: [2P] per-row values, chosen at even rows -> (losses [P], stats
    summed over pairs: reward_chosen, reward_rejected, reward_margin, reward_accuracy,
    logps_chosen, logps_rejected)."""
    pc, pr = policy[0::2], policy[1::2]
    rc, rr = reference[0::2], reference[1::2]
    if kind == "ipo":
        n_c, n_r = jnp.maximum(lengths[0::2], 1.0), jnp.maximum(lengths[1::2], 1.0)
        h = (pc - rc) / n_c - (pr - rr) / n_r
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif kind == "sigmoid":
        h = (pc - rc) - (pr - rr)
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - (
            label_smoothing * jax.nn.log_sigmoid(-beta * h)
        )
    else:
        raise ValueError(f"dpo_loss={kind!r}: expected 'sigmoid' or 'ipo'")
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    stats = {
        "dpo_reward_chosen": jnp.sum(chosen),
        "dpo_reward_rejected": jnp.sum(rejected),
        "dpo_reward_margin": jnp.sum(chosen - rejected),
        "dpo_reward_accuracy": jnp.sum((chosen > rejected).astype(jnp.float32)),
        "dpo_logps_chosen": jnp.sum(pc),
        "dpo_logps_rejected": jnp.sum(pr),
    }
    return losses, stats
