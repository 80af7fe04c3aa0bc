"""The one module every weight matmul goes through.

`Linear` contracts the trailing `len(in_shape)` axes of its input with a kernel of shape
`in_shape + out_shape` (so attention's [embed] -> [heads, head_dim] and [heads, head_dim] -> [embed]
projections, the MLP and the output head are all the same module). `GroupedLinear` is its per-expert
twin for MoE: a kernel [experts, in, out] whose products are in `experts.py`.

Hook point for LoRA and quantization: a wrapper replaces a `Linear` in the model tree with a module of
the same call signature (`x -> y`), found with `iter_linears`. The wrapper reads the base weights
through `Linear.weight(dtype)` (the only place a kernel is read), so model code never changes for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
from flax import nnx

from llm_core.layers.params import param


class Linear(nnx.Module):
    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        axes: Sequence[str | None],
        *,
        weight_dtype,
        use_bias: bool = False,
        out_dtype=None,
        rngs: nnx.Rngs | None,
        scale: float = 0.02,
    ):
        """axes: logical names of the kernel's axes (in axes then out axes). out_dtype: accumulate
        and return in this dtype (e.g. float32 for logits); default: the input's dtype."""
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        if len(axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"Linear: {len(axes)} axis names for kernel {self.kernel_shape}")
        self.out_dtype = out_dtype
        self.kernel = param(rngs, self.kernel_shape, tuple(axes), weight_dtype, scale=scale)
        if use_bias:
            out_axes = tuple(axes)[len(self.in_shape) :]
            self.bias = param(rngs, self.out_shape, out_axes, weight_dtype, init="zeros")
        else:
            self.bias = None

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.in_shape + self.out_shape

    def weight(self, dtype) -> jax.Array:
        """The kernel as used in the matmul. Quantized variants override this (dequantize here)."""
        return self.kernel[...].astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"Linear: input {x.shape} does not end in {self.in_shape}")
        acc = self.out_dtype or x.dtype
        y = self.product(x, acc)
        if self.bias is not None:
            y = y + self.bias[...].astype(acc)
        return y.astype(acc)

    def product(self, x: jax.Array, acc) -> jax.Array:
        """x contracted with `weight` over the input axes, accumulated in `acc`. Quantized variants
        may compute it without materialising the float weight."""
        n_in = len(self.in_shape)
        return jax.lax.dot_general(
            x,
            self.weight(x.dtype),
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
            preferred_element_type=acc,
        )


class GroupedLinear(nnx.Module):
    """Stacked per-expert kernels [experts, in, out]. The products live in `experts.py` as pure
    functions of `weight(dtype)`, so they also run per shard under expert parallelism."""

    def __init__(
        self,
        num_groups: int,
        in_dim: int,
        out_dim: int,
        axes: Sequence[str | None],
        *,
        weight_dtype,
        use_bias: bool = False,
        rngs: nnx.Rngs | None,
        scale: float = 0.02,
    ):
        self.kernel = param(
            rngs, (num_groups, in_dim, out_dim), tuple(axes), weight_dtype, scale=scale
        )
        self.bias = (
            param(rngs, (num_groups, out_dim), (axes[0], axes[2]), weight_dtype, init="zeros")
            if use_bias
            else None
        )

    def weight(self, dtype) -> jax.Array:
        return self.kernel[...].astype(dtype)

    def bias_of(self, dtype) -> jax.Array | None:
        """Per-group biases [groups, out] in `dtype`, or None."""
        return None if self.bias is None else self.bias[...].astype(dtype)


def iter_linears(module: nnx.Module) -> Iterator[tuple[tuple, Linear | GroupedLinear]]:
    """(path, module) for every Linear / GroupedLinear in a model: where LoRA and quantization hook in."""
    for path, node in nnx.iter_graph(module):
        if isinstance(node, Linear | GroupedLinear):
            yield path, node
