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
    total = 0.0
    for path, size, expert in _leaves(json.dumps(cfg.to_dict(), sort_keys=True)):
        if exclude_embeddings and path[0] == "embedder":
            continue
        total += size * cfg.num_experts_per_tok / cfg.num_experts if (active and expert) else size
    return round(total)


@cache
def _leaves(cfg_json: str) -> tuple[tuple[tuple, int, bool], ...]:
    """(path, size, is expert-stacked) of every parameter (cached: counting is asked for often)."""
    from llm_core.models.transformer import build_model

    cfg = Config(**json.loads(cfg_json))
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding") or ()
        out.append((tuple(path), math.prod(var.shape), "exp" in axes))
    return tuple(out)
