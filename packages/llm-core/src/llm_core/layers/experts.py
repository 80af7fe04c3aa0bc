"""The expert FFN of a MoE layer as pure functions of the stacked expert weights.

Pure (weights passed in, no module state) so that the same code runs on one device and, under
`shard_map`, on the local experts of an expert-parallel shard. Rows arrive sorted by expert with
`sizes[e]` rows for expert e (dropless), or as a dense [experts, capacity, embed] buffer.

`moe_matmul` picks how a sorted block of rows meets its expert's weights:
- `grouped_matmul`: `llm_kernels.grouped_matmul` (C++ kernel on CPU, Pallas on TPU/GPU): each
  expert multiplies only its own rows.
- `ragged_dot`: `jax.lax.ragged_dot`; XLA:CPU runs it as a dense matmul over every expert.
- `tiled`: rows padded to whole tiles per expert, one batched matmul over the tiles.
- `dense`: every expert on every row, then each row keeps its own expert's result (experts-times
  the FLOPs; exact, for tiny expert counts and tests).
- `auto`: the fastest measured on the platform (see `resolve_matmul`): the grouped matmul on the
  CPU, `tiled` on TPU / GPU until the Pallas kernels have been measured there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llm_core.layers.qat import ExpertQuantization

MIN_ROWS_FOR_TILES = 16  # fewer rows per expert (decoding): tiles would be mostly padding


class ExpertWeights(NamedTuple):
    """Stacked expert kernels, already in the compute dtype: gate, up [E, D, F]; down [E, F, D];
    optional biases gate_bias, up_bias [E, F] and down_bias [E, D] (GPT-OSS)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None


def gated_activation(cfg) -> Callable:
    """(gate, up) -> hidden of the experts: act(gate) * up, or GPT-OSS's clamped SwiGLU."""
    if cfg.moe_gating == "clamped_swiglu":
        alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit

        def clamped(gate, up):
            gate = jnp.minimum(gate, limit)
            up = jnp.clip(up, -limit, limit)
            return (up + 1) * gate * jax.nn.sigmoid(gate * alpha)

        return clamped
    from llm_core.layers.mlp import ACTIVATIONS, gated

    return partial(gated, ACTIVATIONS[cfg.mlp_activation])


def resolve_matmul(method: str) -> str:
    """`auto` -> the fastest measured: on the CPU with the compiled llm-kernels the grouped matmul
    kernel (benchmarks/train_moe.py: 1.43x `tiled`, 3.3x `ragged_dot`); elsewhere `tiled` (the
    Pallas kernels have not been measured on TPU / GPU yet). Other names pass through."""
    if method != "auto":
        return method
    import jax

    import llm_kernels

    if jax.default_backend() == "cpu" and llm_kernels.cpu_kernels_available():
        return "grouped_matmul"
    return "tiled"


def gated_ffn(
    x: jax.Array,
    w: ExpertWeights,
    act: Callable,
    matmul: Callable,
    rows_bias: Callable,
    quant: ExpertQuantization | None = None,
) -> jax.Array:
    """down(act(gate(x), up(x))), with `matmul(x, kernel)` doing each expert-weight product and
    `rows_bias(bias [E, F])` giving each row its expert's bias, broadcastable to the product;
    `quant` (quantized training) rounds both operands of every product first."""
    if quant is not None:
        matmul = quant.wrap(matmul)

    def product(x, kernel, bias):
        y = matmul(x, kernel)
        return y if bias is None else y + rows_bias(bias).astype(y.dtype)

    hidden = act(product(x, w.gate, w.gate_bias), product(x, w.up, w.up_bias))
    return product(hidden, w.down, w.down_bias)


def sorted_expert_ffn(
    xs: jax.Array,
    expert_of_row: jax.Array,
    sizes: jax.Array,
    w: ExpertWeights,
    act: Callable,
    method: str,
    quant: ExpertQuantization | None = None,
) -> jax.Array:
    """Rows [N, D] sorted by expert (`sizes` [E] int32 rows each, `expert_of_row` [N]) -> [N, D].
    Rows past sum(sizes) come out as zeros (grouped_matmul, ragged_dot) or are unused padding."""
    method = resolve_matmul(method)
    e = w.gate.shape[0]
    row_expert = jnp.minimum(expert_of_row, e - 1)

    def by_row(b):
        return b[row_expert]

    if method == "grouped_matmul":
        from llm_kernels import grouped_matmul

        return gated_ffn(xs, w, act, lambda x, k: grouped_matmul(x, k, sizes), by_row, quant)
    if method == "ragged_dot":
        return gated_ffn(xs, w, act, lambda x, k: jax.lax.ragged_dot(x, k, sizes), by_row, quant)
    if method == "dense":
        x_all = jnp.broadcast_to(xs, (e, *xs.shape))
        y = gated_ffn(
            x_all, w, act, lambda x, k: jnp.einsum("end,edf->enf", x, k), lambda b: b[:, None],
            quant,
        )  # fmt: skip
        return jnp.take_along_axis(y, row_expert[None, :, None], 0)[0]
    if method == "tiled":
        rows_per_expert = xs.shape[0] / e
        if rows_per_expert < MIN_ROWS_FOR_TILES:
            matmul = lambda x, k: jax.lax.ragged_dot(x, k, sizes)  # noqa: E731
            return gated_ffn(xs, w, act, matmul, by_row, quant)
        tile = 128 if rows_per_expert >= 128 else 64 if rows_per_expert >= 64 else 32
        return _tiled_ffn(xs, expert_of_row, sizes, w, act, tile, quant)
    raise ValueError(f"moe_matmul: unknown method {method!r}")


def _tiled_ffn(xs, expert_of_row, sizes, w: ExpertWeights, act, tile: int, quant=None):
    """Each expert's rows padded to whole tiles -> one batched matmul per weight over the tiles
    -> back to the sorted rows."""
    n, e = xs.shape[0], w.gate.shape[0]
    padded = (sizes + tile - 1) // tile * tile
    pad_start = jnp.cumsum(padded) - padded
    rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[expert_of_row]
    dest = pad_start[expert_of_row] + rank  # padded row of each sorted row
    num_tiles = -(-n // tile) + e  # bound: one partly filled tile per expert
    x = jnp.zeros((num_tiles * tile, xs.shape[1]), xs.dtype).at[dest].set(xs)
    x = x.reshape(num_tiles, tile, -1)
    starts = jnp.arange(num_tiles) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), starts, side="right"), e - 1)
    y = gated_ffn(
        x, w, act, lambda x, k: jnp.einsum("tri,tio->tro", x, k[tile_expert]),
        lambda b: b[tile_expert][:, None], quant,
    )  # fmt: skip
    return y.reshape(num_tiles * tile, -1)[dest]


def capacity_buffer_ffn(
    buf: jax.Array, w: ExpertWeights, act: Callable, quant: ExpertQuantization | None = None
) -> jax.Array:
    """Dense buffer [E, capacity, D] -> [E, capacity, D], expert e on its own rows."""
    return gated_ffn(
        buf, w, act, lambda x, k: jnp.einsum("gri,gio->gro", x, k), lambda b: b[:, None], quant
    )
