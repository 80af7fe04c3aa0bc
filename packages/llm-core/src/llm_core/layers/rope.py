"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules, partial rotary.

Uses the rotate-half layout (first half / second half of the rotated dims), as Hugging Face does for
Llama, Mistral, Qwen and Gemma, so converted weights need no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class RopeSpec:
    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    rotary_dim: int = 0  # dims rotated (head_dim * partial_rotary_factor)


def rope_spec(cfg, local: bool = False) -> RopeSpec:
    """Gemma 3 local layers use their own base (`rope_local_theta`) and no scaling."""
    rotary_dim = int(cfg.resolved_head_dim * cfg.partial_rotary_factor)
    if local and cfg.rope_local_theta is not None:
        return RopeSpec(theta=cfg.rope_local_theta, rotary_dim=rotary_dim)
    return RopeSpec(
        kind=cfg.rope_kind,
        theta=cfg.rope_theta,
        factor=cfg.rope_scaling_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position=cfg.rope_original_max_position,
        beta_fast=cfg.rope_yarn_beta_fast,
        beta_slow=cfg.rope_yarn_beta_slow,
        attention_factor=cfg.rope_yarn_attention_factor,
        rotary_dim=rotary_dim,
    )


def inverse_frequencies(spec: RopeSpec) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies and the attention (cos/sin) scaling factor."""
    dim = spec.rotary_dim
    inv = 1.0 / (spec.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scale = 1.0
    if spec.kind == "linear":
        inv = inv / spec.factor
    elif spec.kind == "llama3":
        low_wavelen = spec.original_max_position / spec.low_freq_factor
        high_wavelen = spec.original_max_position / spec.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / spec.factor, inv)
        smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
            spec.high_freq_factor - spec.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_medium, smoothed, scaled)
    elif spec.kind == "yarn":
        base, factor = spec.theta, spec.factor

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(spec.original_max_position / (num_rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low = max(math.floor(correction_dim(spec.beta_fast)), 0)
        high = min(math.ceil(correction_dim(spec.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        scale = (
            spec.attention_factor
            if spec.attention_factor is not None
            else (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        )
    return inv.astype(np.float32), scale


def apply_rope(x: jax.Array, positions: jax.Array, spec: RopeSpec) -> jax.Array:
    """x: [B, S, H, D]; positions: [B, S]. Rotates the first `rotary_dim` dims of each head."""
    inv, scale = inverse_frequencies(spec)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [B, S, dim/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb) * scale, jnp.sin(emb) * scale
    rot, rest = x[..., : spec.rotary_dim], x[..., spec.rotary_dim :]
    rot32 = rot.astype(jnp.float32)
    half = spec.rotary_dim // 2
    rotated = jnp.concatenate([-rot32[..., half:], rot32[..., :half]], axis=-1)
    out = (rot32 * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
