"""Parameter creation with logical axis names (mapped to mesh axes by `llm_core.sharding`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
    init: str = "normal",
    scale: float = 0.02,
) -> nnx.Param:
    """A parameter tagged with logical axes; `init` is 'normal' (std `scale`), 'zeros' or 'ones'."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)
