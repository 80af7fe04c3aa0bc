"""The model's cached forward over per-layer weights: the serving fast path.

`Transformer.forward_with_cache` runs its stacked layers with `lax.scan`; on the CPU every step of
that scan copies the layer's weights out of the stack before its matmuls, which doubles the weight
traffic of a memory-bound decode step (bench-small, batch 1: 7.6 ms -> 5.2 ms per token without it).
`Layerwise` splits the model once into its parts (embedder, one state per layer group, tail, final
norm, output head) and runs the same modules in a Python loop under `jit`, so each matmul reads its
own weight array. It computes what `forward_with_cache` computes (tests hold it to the full forward and
to Hugging Face `generate`); `Engine(cfg, graphdef)` keeps the plain `forward_with_cache` path.

Memory: the per-layer arrays are copies of the stacked ones; drop the model object after building
the engine to give the stacked copy back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core import KVCache
from llm_core.models import output_logits


class Layerwise:
    def __init__(self, model: nnx.Module):
        cfg = self.cfg = model.cfg
        self.group_size = cfg.scan_group_size
        self.defs: dict = {}
        params: dict = {}
        for name in ("embedder", "final_norm", "tail"):
            module = getattr(model, name, None)
            if module is None:
                params[name] = None
                continue
            self.defs[name], params[name] = nnx.split(module)
        params["lm_head"] = None if cfg.tie_embeddings else jnp.asarray(model.lm_head[...])
        params["groups"] = []
        if model.groups is not None:
            self.defs["group"], stacked = nnx.split(model.groups)
            params["groups"] = [
                jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked)
                for i in range(model.num_groups)
            ]
        self.params = params

    def forward_with_cache(self, params, ids, positions, cache: KVCache):
        """Same contract as `Transformer.forward_with_cache`: returns (float32 logits, new cache)."""
        cfg, g = self.cfg, self.group_size
        embedder = nnx.merge(self.defs["embedder"], params["embedder"])
        x = embedder.encode(ids, positions, jnp.dtype(cfg.dtype))
        ks, vs = [], []
        for i, state in enumerate(params["groups"]):
            group = nnx.merge(self.defs["group"], state)
            rows = slice(i * g, (i + 1) * g)
            x, (k, v) = group(x, positions, None, (cache.k[rows], cache.v[rows]))
            ks.append(k)
            vs.append(v)
        if params["tail"] is not None:
            n = len(params["groups"]) * g
            tail = nnx.merge(self.defs["tail"], params["tail"])
            x, (k, v) = tail(x, positions, None, (cache.k[n:], cache.v[n:]))
            ks.append(k)
            vs.append(v)
        final_norm = nnx.merge(self.defs["final_norm"], params["final_norm"])
        logits = output_logits(cfg, x, final_norm, embedder, params["lm_head"])
        return logits, KVCache(k=jnp.concatenate(ks), v=jnp.concatenate(vs))
