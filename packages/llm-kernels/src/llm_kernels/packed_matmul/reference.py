"""Packing of a float [k, n] weight into column panels, and the plain jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PANEL = 32  # columns per panel (csrc/kernels.h kPackedPanel)


def pack_panels(w: jax.Array) -> jax.Array:
    """[k, n] -> [ceil(n / 32), k, 32]: panel p holds columns 32p..32p+31, the last zero-padded,
    so each panel is one contiguous stream for the kernel."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
    return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def unpack_panels(panels: jax.Array, n: int) -> jax.Array:
    """The [k, n] weight of `pack_panels`' output."""
    p, k, width = panels.shape
    return panels.transpose(1, 0, 2).reshape(k, p * width)[:, :n]


def packed_matmul_reference(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [..., k] @ unpack_panels(panels, n) -> [..., n] float32."""
    w = unpack_panels(panels, n)
    return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32))
