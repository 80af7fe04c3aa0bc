"""Serving's CPU matmuls on panel-packed weights (`packed_matmul: true`, llm-serve's decode view).

`PackedLinear` replaces a float32 or bfloat16 `Linear` with no leading (layer) axes: its kernel
flattened to [in, out] and stored as `llm_kernels.pack_panels` 32-column panels (in its own dtype),
multiplied by `llm_kernels.packed_matmul` in float32. A decode step on the CPU is a stream of matmuls
with a few rows that read every weight once; on a row-major weight XLA:CPU reaches a fraction of the
memory bandwidth (and its bfloat16 matrix-vector products far less), on panels the kernel reaches it.
The weights are frozen (the gradient flows to the input only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.linear import Linear, iter_linears
from llm_core.layers.quantize import set_module


class PackedLinear(nnx.Module):
    """A frozen float32 or bfloat16 `Linear` with its kernel packed in panels; same call signature.
    The product runs in float32 (bfloat16 weights are widened in registers), then is cast to the
    layer's output dtype."""

    def __init__(self, base: Linear):
        from llm_kernels import pack_panels

        self.in_shape, self.out_shape, self.out_dtype = (
            base.in_shape,
            base.out_shape,
            base.out_dtype,
        )
        self.bias = base.bias
        k, n = math.prod(self.in_shape), math.prod(self.out_shape)
        self.panels = nnx.Param(pack_panels(base.kernel[...].reshape(k, n)))

    def weight(self, dtype) -> jax.Array:
        from llm_kernels import unpack_panels

        w = unpack_panels(self.panels[...], math.prod(self.out_shape))
        return w.reshape(*self.in_shape, *self.out_shape).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return Linear.__call__(self, x)

    def product(self, x: jax.Array, acc) -> jax.Array:
        from llm_kernels import packed_matmul

        lead = x.shape[: x.ndim - len(self.in_shape)]
        n = math.prod(self.out_shape)
        x2 = x.reshape(*lead, math.prod(self.in_shape)).astype(jnp.float32)
        y = packed_matmul(x2, self.panels[...], n)
        return y.reshape(*lead, *self.out_shape).astype(acc)


def packs_on_this_backend(cfg) -> bool:
    """Whether a decode view should be packed: `packed_matmul` on, on the CPU, with llm-kernels'
    compiled kernels loaded (elsewhere XLA's own matmul is kept)."""
    import llm_kernels

    return (
        cfg.packed_matmul and jax.default_backend() == "cpu" and llm_kernels.cpu_kernels_available()
    )


def pack_linears(model: nnx.Module) -> int:
    """Replace every float32 or bfloat16 `Linear` without leading (layer) axes, except MoE routers,
    with a `PackedLinear`; returns how many. Run it on a decode view (`unstack_layers`), whose
    layers hold their own arrays."""
    chosen = [
        (path, lin)
        for path, lin in iter_linears(model)
        if isinstance(lin, Linear)
        and path[-1] != "router"
        and lin.kernel[...].dtype in (jnp.float32, jnp.bfloat16)
        and lin.kernel[...].ndim == len(lin.in_shape) + len(lin.out_shape)
    ]
    for path, lin in chosen:
        set_module(model, path, PackedLinear(lin))
    return len(chosen)
