"""Optimizers and learning-rate schedules (optax), built from the config."""

from __future__ import annotations

import jax
import optax

from llm_core import Config, ConfigError

# Parameter path fragments that never get weight decay (norm scales, biases, embeddings' norms).
NO_DECAY_FRAGMENTS = ("norm", "bias", "scale")


def make_schedule(cfg: Config) -> optax.Schedule:
    """warmup + cosine, linear, constant or warmup-stable-decay, from `lr_schedule`."""
    peak, steps = cfg.learning_rate, max(cfg.steps, 1)
    warmup = min(cfg.warmup_steps, steps)
    end = peak * cfg.min_lr_ratio
    rest = max(steps - warmup, 1)
    warm = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
    if cfg.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.lr_schedule == "linear":
        main = optax.linear_schedule(peak, end, rest)
    elif cfg.lr_schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.lr_schedule == "wsd":
        if not 0.0 <= cfg.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {cfg.decay_fraction}.")
        decay = round(steps * cfg.decay_fraction)
        stable = max(rest - decay, 0)
        main = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, max(decay, 1))],
            [stable],
        )
    else:  # pragma: no cover - the config type already restricts the values
        raise ConfigError(f"Unknown lr_schedule {cfg.lr_schedule!r}.")
    if not warmup:
        return main
    return optax.join_schedules([warm, main], [warmup])


def path_to_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def decay_mask(params):
    """True for weights that get weight decay: everything but norms, biases and 1-D scales."""

    def keep(path, leaf) -> bool:
        name = path_to_str(path).lower()
        if any(frag in name for frag in NO_DECAY_FRAGMENTS):
            return False
        return getattr(leaf, "ndim", 2) >= 2

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Global-norm clipping followed by the chosen optimizer, with the schedule built in."""
    lr = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(
            lr,
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    elif cfg.optimizer == "adam":
        opt = optax.adam(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
    elif cfg.optimizer == "sgd":
        opt = optax.sgd(lr, momentum=cfg.adam_b1)
    elif cfg.optimizer == "lion":
        opt = optax.lion(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adafactor":
        opt = optax.adafactor(lr)
    else:  # pragma: no cover
        raise ConfigError(f"Unknown optimizer {cfg.optimizer!r}.")
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*chain, opt)
