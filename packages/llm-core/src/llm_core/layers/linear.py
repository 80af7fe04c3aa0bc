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
from llm_core.layers.sequence_parallel import length_axes


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
        return flat_product(x, self.weight(x.dtype), len(self.in_shape), acc)


def flat_product(x: jax.Array, w: jax.Array, n_in: int, acc) -> jax.Array:
    """x [..., *in] contracted with w [*in, *out] over the `n_in` input axes, the leading axes of x
    merged into one first. With two or more leading axes ([batch, seq]), XLA:CPU computes the
    weight gradient from a transposed copy of the output gradient; merged, it reads it in place
    (bench-small's step: 1.06 -> 0.83 s). Not under a mesh that splits the length axis (context or
    sequence parallelism): merging it with the batch axis would make the partitioner gather it."""
    lead = x.shape[: x.ndim - n_in]
    merge = len(lead) > 1 and not _length_split()
    flat = x.reshape((-1, *x.shape[x.ndim - n_in :])) if merge else x
    y = jax.lax.dot_general(
        flat,
        w,
        ((tuple(range(flat.ndim - n_in, flat.ndim)), tuple(range(n_in))), ((), ())),
        preferred_element_type=acc,
    )
    return y.reshape(lead + y.shape[flat.ndim - n_in :]) if merge else y


def _length_split() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and length_axes(dict(mesh.shape)) is not None


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
