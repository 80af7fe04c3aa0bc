"""Which platform an op runs on, for backend dispatch."""

from __future__ import annotations

import jax


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu' (or whatever else JAX reports, which the ops reject loudly)."""
    platform = jax.default_backend()
    if platform in ("cuda", "rocm"):
        return "gpu"
    return platform
