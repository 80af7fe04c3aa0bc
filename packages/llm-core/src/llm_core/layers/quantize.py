"""Weight-only quantization of `Linear` modules: post-training quantization for serving
(`weight_quantization: int8 | int4`) and QLoRA's frozen base (`lora_base_quantization: int8`).

int8: symmetric, one float32 scale per output channel (max |w| over the input axes / 127).
int4: symmetric, one float32 scale per group of `weight_quantization_group_size` consecutive inputs
(of the flattened input axes) and output channel (max |w| in the group / 7), two values per byte
(low nibble first). `Int8Linear.weight(dtype)` / `Int4Linear.weight(dtype)` dequantize inside the
matmul's program, so the model code never changes and no float copy of the weights is kept.
"""

from __future__ import annotations

import math

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


class QuantizedLinear(nnx.Module):
    """A frozen `Linear` stored quantized: same call signature as `Linear`; subclasses store
    `kernel_q` and `scale` and dequantize in `weight(dtype)`."""

    def _take_layout(self, base: Linear) -> tuple[jax.Array, tuple, int]:
        """Copy `base`'s shapes and bias; (its kernel, the kernel's logical axes, leading axes)."""
        self.in_shape, self.out_shape, self.out_dtype = (
            base.in_shape,
            base.out_shape,
            base.out_dtype,
        )
        self.bias = base.bias
        kernel = base.kernel
        axes = tuple(getattr(kernel, "out_sharding", None) or (None,) * kernel.ndim)
        return kernel[...], axes, kernel.ndim - len(self.in_shape) - len(self.out_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        return Linear.__call__(self, x)

    def product(self, x: jax.Array, acc) -> jax.Array:
        return Linear.product(self, x, acc)

    def _flat_inputs_product(self, x: jax.Array, matmul, acc) -> jax.Array:
        """x [..., in...] -> matmul(x [..., k]) [..., n] (a weight-only kernel over the flattened
        axes) -> [..., out...] in `acc`."""
        lead = x.shape[: x.ndim - len(self.in_shape)]
        y = matmul(x.reshape(*lead, math.prod(self.in_shape)))
        return y.reshape(*lead, *self.out_shape).astype(acc)


class Int8Linear(QuantizedLinear):
    """int8 with per-output-channel scales (QLoRA's base, `weight_quantization: int8`)."""

    def __init__(self, base: Linear):
        kernel, axes, n_lead = self._take_layout(base)
        q, scale = quantize_int8(kernel, n_lead, len(self.in_shape))
        self.kernel_q = nnx.Param(q, out_sharding=axes, eager_sharding=False)
        out_axes = axes[:n_lead] + axes[n_lead + len(self.in_shape) :]
        self.scale = nnx.Param(scale, out_sharding=out_axes, eager_sharding=False)

    def product(self, x: jax.Array, acc) -> jax.Array:
        """Without leading (layer) axes, float32: llm_kernels.int8_matmul, which on the CPU reads
        the int8 kernel directly for small batches (decode) instead of a dequantized float copy."""
        if self.scale.ndim != len(self.out_shape) or x.dtype != jnp.float32:
            return Linear.product(self, x, acc)
        from llm_kernels import int8_matmul

        k, n = math.prod(self.in_shape), math.prod(self.out_shape)
        q, scale = self.kernel_q[...].reshape(k, n), self.scale[...].reshape(n)
        return self._flat_inputs_product(x, lambda x2: int8_matmul(x2, q, scale), acc)

    def weight(self, dtype) -> jax.Array:
        # leading (layer) axes from the scale's rank: inside a scan they are gone
        n_lead = self.scale.ndim - len(self.out_shape)
        in_axes = tuple(range(n_lead, n_lead + len(self.in_shape)))
        scale = jnp.expand_dims(self.scale[...], in_axes)
        return (self.kernel_q[...].astype(jnp.float32) * scale).astype(dtype)


class GroupSizeError(ValueError):
    """weight_quantization_group_size does not divide a Linear's input size."""


def quantize_int4(kernel, n_lead: int, in_shape: tuple[int, ...], group: int, name: str = ""):
    """kernel [lead..., in..., out...] -> (packed uint8 [lead..., in_total / 2, out...],
    float32 scale [lead..., in_total / group, out...])."""
    kernel = jnp.asarray(kernel, jnp.float32)
    lead, out = kernel.shape[:n_lead], kernel.shape[n_lead + len(in_shape) :]
    total = math.prod(in_shape)
    if total % group or group % 2:
        raise GroupSizeError(
            f"weight_quantization_group_size={group} must be even and divide the input size "
            f"{total} of {name or 'a Linear'}."
        )
    flat = kernel.reshape(*lead, total // group, group, *out)
    scale = jnp.max(jnp.abs(flat), axis=n_lead + 1) / 7.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(flat / jnp.expand_dims(scale, n_lead + 1)), -8, 7).astype(jnp.int8)
    pairs = q.reshape(*lead, total // 2, 2, *out).astype(jnp.uint8) & 0xF
    low, high = jnp.take(pairs, 0, axis=n_lead + 1), jnp.take(pairs, 1, axis=n_lead + 1)
    return (low | (high << 4)).astype(jnp.uint8), scale


def dequantize_int4(packed, scale, n_lead: int, in_shape: tuple[int, ...], dtype):
    """The float kernel [lead..., in..., out...] of `quantize_int4`'s output."""
    nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=n_lead + 1).astype(jnp.int8)
    values = jnp.where(nibbles > 7, nibbles - 16, nibbles).astype(jnp.float32)
    lead, out = packed.shape[:n_lead], packed.shape[n_lead + 1 :]
    groups = scale.shape[n_lead]
    values = values.reshape(*lead, groups, -1, *out) * jnp.expand_dims(scale, n_lead + 1)
    return values.reshape(*lead, *in_shape, *out).astype(dtype)


class Int4Linear(QuantizedLinear):
    """Grouped int4, two values per byte (see the module docstring)."""

    def __init__(self, base: Linear, group: int, name: str = ""):
        kernel, axes, n_lead = self._take_layout(base)
        q, scale = quantize_int4(kernel, n_lead, self.in_shape, group, name)
        out_axes = (*axes[:n_lead], None, *axes[n_lead + len(self.in_shape) :])
        self.kernel_q = nnx.Param(q, out_sharding=out_axes, eager_sharding=False)
        self.scale = nnx.Param(scale, out_sharding=out_axes, eager_sharding=False)

    def weight(self, dtype) -> jax.Array:
        # leading (layer) axes from the scale's rank: inside a scan they are gone
        n_lead = self.scale.ndim - 1 - len(self.out_shape)
        return dequantize_int4(self.kernel_q[...], self.scale[...], n_lead, self.in_shape, dtype)

    def product(self, x: jax.Array, acc) -> jax.Array:
        """Without leading (layer) axes, float32: llm_kernels.int4_matmul, which on the CPU unpacks
        the int4 kernel in registers for small batches (decode) instead of a float copy."""
        if self.scale.ndim != 1 + len(self.out_shape) or x.dtype != jnp.float32:
            return Linear.product(self, x, acc)
        from llm_kernels import int4_matmul

        n = math.prod(self.out_shape)
        q = self.kernel_q[...].reshape(-1, n)
        scale = self.scale[...].reshape(-1, n)
        return self._flat_inputs_product(x, lambda x2: int4_matmul(x2, q, scale), acc)


def set_module(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    """Replace the submodule at `path` (as `nnx.iter_graph` names it)."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    setattr(parent, path[-1], module)


def quantize_linears(model: nnx.Module, mode: str = "int8", group: int = 128) -> int:
    """Replace every `Linear` except MoE routers with an `Int8Linear` (or, mode int4, an
    `Int4Linear` with `group` inputs per scale); returns how many."""
    chosen = [
        (p, lin) for p, lin in iter_linears(model) if isinstance(lin, Linear) and p[-1] != "router"
    ]
    for path, lin in chosen:
        name = "/".join(str(k) for k in path)
        set_module(model, path, Int4Linear(lin, group, name) if mode == "int4" else Int8Linear(lin))
    return len(chosen)


def quantize_params(params: dict, model: nnx.Module, group: int = 128) -> dict:
    """Float parameters (pure dict) of `model`'s float twin -> the pure dict of its quantized
    twin (`model` built with `weight_quantization: int8 | int4`): kernels of its Int8Linear /
    Int4Linear modules quantized (int4 with `group` inputs per scale)."""
    out = dict(params)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, QuantizedLinear):
            continue
        parent = out
        for key in path[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        src = dict(parent[path[-1]])
        n_lead = src["kernel"].ndim - len(node.in_shape) - len(node.out_shape)
        if isinstance(node, Int4Linear):
            name = "/".join(str(k) for k in path)
            q, scale = quantize_int4(src.pop("kernel"), n_lead, node.in_shape, group, name)
        else:
            q, scale = quantize_int8(src.pop("kernel"), n_lead, len(node.in_shape))
        parent[path[-1]] = {**src, "kernel_q": q, "scale": scale}
    return out
