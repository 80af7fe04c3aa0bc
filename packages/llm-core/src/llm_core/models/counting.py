"""Parameter counts computed abstractly (jax.eval_shape: no memory is allocated).

The one source of parameter counts: `llm-core config show`, llm-train's `plan` and its MFU all use
it. `active=True` counts what one token uses: of each expert-stacked weight (logical axis `exp`),
only `num_experts_per_tok / num_experts` of it.
"""

from __future__ import annotations

import json
import math
from functools import cache

from flax import nnx

from llm_core.config import Config


def count_params(cfg: Config, exclude_embeddings: bool = False, active: bool = False) -> int:
    return _total(
        cfg, active, lambda path, shape: not (exclude_embeddings and path[0] == "embedder")
    )


def matmul_params(cfg: Config) -> int:
    """Weights one token multiplies by (active experts only, the output head included even when tied,
    embeddings lookups, norms and biases excluded): FLOPs per token = 2 x this (forward)."""
    total = _total(cfg, True, lambda path, shape: path[0] != "embedder" and path[-1] == "kernel")
    return total + (cfg.vocab_size * cfg.emb_dim if cfg.tie_embeddings else 0)


def _total(cfg: Config, active: bool, keep) -> int:
    """Sum of the sizes of the parameters `keep(path, shape)` selects; with `active`, an
    expert-stacked weight counts num_experts_per_tok / num_experts of its size."""
    total = 0.0
    for path, shape, expert in _leaves(json.dumps(cfg.to_dict(), sort_keys=True)):
        if keep(path, shape):
            size = math.prod(shape)
            total += (
                size * cfg.num_experts_per_tok / cfg.num_experts if (active and expert) else size
            )
    return round(total)


@cache
def _leaves(cfg_json: str) -> tuple[tuple[tuple, tuple[int, ...], bool], ...]:
    """(path, shape, is expert-stacked) of every parameter (cached: counting is asked for often)."""
    from llm_core.models.transformer import build_model

    cfg = Config(**json.loads(cfg_json))
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding") or ()
        out.append((tuple(path), tuple(var.shape), "exp" in axes))
    return tuple(out)
