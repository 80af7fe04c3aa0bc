"""Parameter counts computed abstractly (jax.eval_shape: no memory is allocated)."""

from __future__ import annotations

import math

from flax import nnx

from llm_core.config import Config


def count_params(cfg: Config, exclude_embeddings: bool = False) -> int:
    from llm_core.models.transformer import build_model

    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    total = 0
    for path, leaf in nnx.to_flat_state(state):
        if exclude_embeddings and path[0] == "embedder":
            continue
        total += math.prod(leaf.shape)
    return total
