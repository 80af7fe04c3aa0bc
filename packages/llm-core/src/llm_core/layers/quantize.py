"""Weight-only int8 quantization of `Linear` modules: post-training quantization for serving
(`weight_quantization: int8`) and QLoRA's frozen base (`lora_base_quantization: int8`).

Symmetric int8 with one float32 scale per output channel (max |w| over the input axes / 127);
`Int8Linear.weight(dtype)` dequantizes, so the model code never changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.linear import Linear, iter_linears


def quantize_int8(kernel, n_lead: int, n_in: int):
    """Symmetric int8 with one float32 scale per output channel (the max |w| over the input axes):
    kernel [lead..., in..., out...] -> (int8 like kernel, scale [lead..., out...])."""
    kernel = jnp.asarray(kernel, jnp.float32)
    in_axes = tuple(range(n_lead, n_lead + n_in))
    scale = jnp.max(jnp.abs(kernel), axis=in_axes) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    expanded = jnp.expand_dims(scale, in_axes)
    q = jnp.clip(jnp.round(kernel / expanded), -127, 127).astype(jnp.int8)
    return q, scale


class Int8Linear(nnx.Module):
    """A frozen `Linear` stored as int8 with per-output-channel scales (QLoRA's base): same call
    signature; `weight(dtype)` dequantizes."""

    def __init__(self, base: Linear):
        self.in_shape, self.out_shape, self.out_dtype = (
            base.in_shape,
            base.out_shape,
            base.out_dtype,
        )
        kernel = base.kernel
        axes = tuple(getattr(kernel, "out_sharding", None) or (None,) * kernel.ndim)
        n_lead = kernel.ndim - len(self.in_shape) - len(self.out_shape)
        q, scale = quantize_int8(kernel[...], n_lead, len(self.in_shape))
        self.kernel_q = nnx.Param(q, out_sharding=axes, eager_sharding=False)
        out_axes = axes[:n_lead] + axes[n_lead + len(self.in_shape) :]
        self.scale = nnx.Param(scale, out_sharding=out_axes, eager_sharding=False)
        self.bias = base.bias

    def weight(self, dtype) -> jax.Array:
        # leading (layer) axes from the scale's rank: inside a scan they are gone
        n_lead = self.scale.ndim - len(self.out_shape)
        in_axes = tuple(range(n_lead, n_lead + len(self.in_shape)))
        scale = jnp.expand_dims(self.scale[...], in_axes)
        return (self.kernel_q[...].astype(jnp.float32) * scale).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return Linear.__call__(self, x)


def set_module(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    """Replace the submodule at `path` (as `nnx.iter_graph` names it)."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    setattr(parent, path[-1], module)


def quantize_linears(model: nnx.Module) -> int:
    """Replace every `Linear` except MoE routers with an `Int8Linear`; returns how many."""
    chosen = [
        (p, lin) for p, lin in iter_linears(model) if isinstance(lin, Linear) and p[-1] != "router"
    ]
    for path, lin in chosen:
        set_module(model, path, Int8Linear(lin))
    return len(chosen)


def quantize_params(params: dict, model: nnx.Module) -> dict:
    """Float parameters (pure dict) of `model`'s float twin -> the pure dict of its int8 twin
    (`model` built with `weight_quantization: int8`): kernels of Int8Linear modules quantized."""
    out = dict(params)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Int8Linear):
            continue
        parent = out
        for key in path[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        src = dict(parent[path[-1]])
        n_lead = src["kernel"].ndim - len(node.in_shape) - len(node.out_shape)
        q, scale = quantize_int8(src.pop("kernel"), n_lead, len(node.in_shape))
        parent[path[-1]] = {**src, "kernel_q": q, "scale": scale}
    return out
