"""TEMPORARY stand-ins for llm_core's model API until it lands on main (removed after the merge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_core.config import MESH_AXES as _AXES
from llm_core.config import resolve_mesh_shape


def create_mesh(cfg, devices=None):
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(cfg, len(devices), 1)
    arr = np.array(devices).reshape([shape[a] for a in _AXES])
    return Mesh(arr, _AXES)


def logical_sharding(mesh, cfg, logical_axes):
    rules = {r[0]: (r[1] if isinstance(r[1], list) else [r[1]]) for r in cfg.logical_axis_rules}
    used, out = set(), []
    for name in logical_axes:
        axes = [a for a in rules.get(name, []) if a and mesh.shape[a] > 1 and a not in used]
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return NamedSharding(mesh, PartitionSpec(*out))


def _p(rngs, shape, names, scale=0.02):
    return nnx.Param(jax.random.normal(rngs.params(), shape) * scale, out_sharding=names)


class Block(nnx.Module):
    def __init__(self, cfg, rngs):
        d, h, hd, m = cfg.emb_dim, cfg.num_heads, cfg.resolved_head_dim, cfg.mlp_dim
        self.cfg = cfg
        self.attn_norm = nnx.Param(jnp.ones((d,)), out_sharding=("norm",))
        self.wq = _p(rngs, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wk = _p(rngs, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wv = _p(rngs, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wo = _p(rngs, (h, hd, d), ("heads", "head_dim", "embed"))
        self.mlp_norm = nnx.Param(jnp.ones((d,)), out_sharding=("norm",))
        self.w1 = _p(rngs, (d, m), ("embed", "mlp"))
        self.w2 = _p(rngs, (m, d), ("mlp", "embed"))

    def __call__(self, x, mask):
        def rms(x, w):
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w

        y = rms(x, self.attn_norm[...])
        q = jnp.einsum("bsd,dhk->bshk", y, self.wq[...])
        k = jnp.einsum("bsd,dhk->bshk", y, self.wk[...])
        v = jnp.einsum("bsd,dhk->bshk", y, self.wv[...])
        s = jnp.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(mask[:, None], s, -1e30)
        a = jnp.einsum("bhqt,bthk->bqhk", jax.nn.softmax(s, -1), v)
        x = x + jnp.einsum("bshk,hkd->bsd", a, self.wo[...])
        y = rms(x, self.mlp_norm[...])
        return x + jax.nn.silu(y @ self.w1[...]) @ self.w2[...]


class StandIn(nnx.Module):
    def __init__(self, cfg, rngs):
        self.embed = _p(rngs, (cfg.vocab_size, cfg.emb_dim), ("vocab", "embed"), 1.0)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.Param(jnp.ones((cfg.emb_dim,)), out_sharding=("norm",))
        self.head = _p(rngs, (cfg.emb_dim, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, ids, positions=None, segment_ids=None):
        seg = jnp.ones_like(ids) if segment_ids is None else segment_ids
        s = ids.shape[1]
        causal = jnp.tril(jnp.ones((s, s), bool))
        mask = causal[None] & (seg[:, :, None] == seg[:, None, :])
        x = self.embed[...][ids]
        for blk in self.blocks:
            x = blk(x, mask)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.norm[...]
        return (x @ self.head[...]).astype(jnp.float32)


def build_model(cfg, rngs):
    with nnx.use_eager_sharding(False):
        return StandIn(cfg, rngs)
