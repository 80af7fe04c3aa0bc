"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules, partial rotary.

Uses the rotate-half layout (first half / second half of the rotated dims), as Hugging Face does for
Llama, Mistral, Qwen and Gemma, so converted weights need no permutation; `rope_interleave` rotates
interleaved pairs (x0, x1), (x2, x3), ... in place instead, as DeepSeek's weights expect.
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
    mscale: float | None = None
    mscale_all_dim: float | None = None
    rotary_dim: int = 0  # dims rotated (head_dim * partial_rotary_factor)
    interleave: bool = False
    truncate: bool = True  # YaRN: round the correction range to whole dims (GPT-OSS: false)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_spec(cfg, local: bool = False, rotary_dim: int | None = None) -> RopeSpec:
    """Gemma 3 local layers use their own base (`rope_local_theta`) and no scaling. `rotary_dim`:
    dims rotated when not head_dim * partial_rotary_factor (MLA's rotary key part)."""
    if rotary_dim is None:
        rotary_dim = int(cfg.resolved_head_dim * cfg.partial_rotary_factor)
    if local and cfg.rope_local_theta is not None:
        return RopeSpec(
            theta=cfg.rope_local_theta, rotary_dim=rotary_dim, interleave=cfg.rope_interleave
        )
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
        mscale=cfg.rope_yarn_mscale,
        mscale_all_dim=cfg.rope_yarn_mscale_all_dim,
        truncate=cfg.rope_yarn_truncate,
        rotary_dim=rotary_dim,
        interleave=cfg.rope_interleave,
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

        low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
        if spec.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        if spec.attention_factor is not None:
            scale = spec.attention_factor
        elif spec.mscale and spec.mscale_all_dim:
            scale = yarn_mscale(factor, spec.mscale) / yarn_mscale(factor, spec.mscale_all_dim)
        else:
            scale = yarn_mscale(factor)
    return inv.astype(np.float32), scale


def apply_rope(x: jax.Array, positions: jax.Array, spec: RopeSpec) -> jax.Array:
    """x: [B, S, H, D]; positions: [B, S]. Rotates the first `rotary_dim` dims of each head."""
    inv, scale = inverse_frequencies(spec)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [B, S, dim/2]
    if spec.interleave:
        return _apply_interleaved(x, angles, scale, spec.rotary_dim)
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb) * scale, jnp.sin(emb) * scale
    rot, rest = x[..., : spec.rotary_dim], x[..., spec.rotary_dim :]
    rot32 = rot.astype(jnp.float32)
    half = spec.rotary_dim // 2
    rotated = jnp.concatenate([-rot32[..., half:], rot32[..., :half]], axis=-1)
    out = (rot32 * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _apply_interleaved(x: jax.Array, angles: jax.Array, scale: float, dim: int) -> jax.Array:
    """Rotate pairs (x[2i], x[2i+1]) by angle i, in place (the complex-number form of DeepSeek)."""
    cos, sin = jnp.cos(angles)[:, :, None] * scale, jnp.sin(angles)[:, :, None] * scale
    rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    out = out.reshape(rot.shape).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
