"""Quantized training (`quantization: int8 | fp8 | fp8_full`) through qwix.

qwix's `QtProvider` intercepts the `dot_general`s of the modules that match a rule while the model
runs, quantizes both operands (weights per output channel, or per `quantization_tile_size` tile of
the contraction axis; activations per token) and computes the product on the quantized values; its
custom VJP passes gradients straight through the rounding (and, for `fp8_full`, quantizes the
incoming gradients to e5m2 in the backward). Parameters, optimizer state and checkpoints stay in
the float weight dtype.

Quantized: every `Linear` directly under an attention module (q, k, v, o and MLA's projections),
the dense / shared-expert MLP projections, and the MoE routed experts (as `jax.lax.ragged_dot`,
`moe_matmul: ragged_dot`, by qwix, whose ragged_dot takes the stacked expert kernels as the weight;
under the other methods by `ExpertQuantization`, below). Not quantized: the attention scores and
values (two activations), the router, the embedding and the output head (their precision decides
the loss).

qwix intercepts one entry method of the model; ours is `hidden` (the layer stack), which `forward`,
the training loss and the serving engine all go through. We do not use qwix's model-level rule
matching for anything else, and we skip its first eager call (`skip_nnx_init`): without static
activation scales there is nothing to initialise.

The routed experts under `moe_matmul: grouped_matmul | tiled | dense` (and the capacity buffer) run
through our C++ / Pallas kernel or gathered einsums, which qwix cannot intercept, so
`ExpertQuantization` quantizes their operands itself with qwix's `quantize` / `dequantize`: rows
per token, kernels per (expert, output channel), both optionally per contraction tile; the product
runs on the dequantized values (equal to the integer product times the scales up to float
rounding), gradients pass straight through, and `fp8_full` rounds each product's incoming
gradient to e5m2 per row. One deviation from qwix's ragged_dot: its kernel scales are per output
channel shared by all experts (a ragged product cannot rescale per expert afterwards); ours are
per expert, which our fake-quantized products can afford.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

# fullmatch over qwix's module paths ("groups/layer_0/attn/q", "mtp_0/layer/mlp/down", ...)
QUANTIZED_PATHS = r"(.*/)?(attn/[^/]+|mlp/(gate|up|down)|mlp/shared/(gate|up|down))"
EXPERT_PATHS = r"(.*/)?mlp"  # the MoE module, where the expert products run

# int8 in the symmetric range: the absmax maps to 127. qwix's default maps it to 127.5, a rounding
# tie that differently compiled programs (one device vs a sharded mesh, grouped vs dense expert
# products) break differently, so the same rows would round differently.
SYMMETRIC_INT8 = f"absmax,{127.5 / 127!r}"
MODES = {
    "int8": {
        "weight_qtype": jnp.int8,
        "act_qtype": jnp.int8,
        "weight_calibration_method": SYMMETRIC_INT8,
        "act_calibration_method": SYMMETRIC_INT8,
    },
    "fp8": {"weight_qtype": jnp.float8_e4m3fn, "act_qtype": jnp.float8_e4m3fn},
    "fp8_full": {
        "weight_qtype": jnp.float8_e4m3fn,
        "act_qtype": jnp.float8_e4m3fn,
        "bwd_qtype": jnp.float8_e5m2,
    },
}


def quantize_for_training(model: nnx.Module, cfg) -> nnx.Module:
    """The model with quantized matmuls (a copy; see the module docstring)."""
    import qwix

    from llm_core.layers.experts import resolve_matmul

    mode = cfg.quantization
    if mode not in MODES:
        raise ValueError(f"quantization={mode!r}: expected one of none, {', '.join(MODES)}")
    settings = dict(tile_size=cfg.quantization_tile_size or None, **MODES[mode])
    rules = [qwix.QtRule(module_path=QUANTIZED_PATHS, op_names=("dot_general",), **settings)]
    if cfg.num_experts > 0 and resolve_matmul(cfg.moe_matmul) == "ragged_dot":
        rules.append(qwix.QtRule(module_path=EXPERT_PATHS, op_names=("ragged_dot",), **settings))
    dummy = jnp.zeros((1, 1), jnp.int32)
    return qwix.quantize_model(
        model, qwix.QtProvider(rules), dummy, methods=("hidden",), skip_nnx_init=True
    )


def fake_quantize(x: jax.Array, qtype, axis: int, tile_size: int = 0) -> jax.Array:
    """x rounded to `qtype` and back: one absmax scale per position of every axis but `axis`
    (the contraction axis), or per `tile_size`-wide tile of it; int8 in the symmetric range
    (`SYMMETRIC_INT8`). No gradient rule of its own."""
    import qwix

    axis = axis % x.ndim
    others = [a for a in range(x.ndim) if a != axis]
    tiles = {axis: tile_size} if tile_size else None
    calibration = SYMMETRIC_INT8 if qtype == jnp.int8 else "absmax"
    q = qwix.quantize(
        x, qtype, channelwise_axes=others, tiled_axes=tiles, calibration_method=calibration
    )
    return qwix.dequantize(q).astype(x.dtype)


def _straight_through(x: jax.Array, qtype, axis: int, tile_size: int) -> jax.Array:
    return x + jax.lax.stop_gradient(fake_quantize(x, qtype, axis, tile_size) - x)


@jax.custom_vjp
def _e5m2_gradient(y: jax.Array) -> jax.Array:
    """Identity whose backward rounds the incoming gradient to e5m2 per row (`fp8_full`)."""
    return y


_e5m2_gradient.defvjp(
    lambda y: (y, None), lambda _, g: (fake_quantize(g, jnp.float8_e5m2, axis=-1),)
)


@dataclass(frozen=True)
class ExpertQuantization:
    """Quantized training of the routed experts' products outside qwix (module docstring)."""

    mode: str
    tile_size: int = 0

    @classmethod
    def from_config(cls, cfg) -> ExpertQuantization | None:
        """None without quantized training, or when qwix quantizes the experts (ragged_dot)."""
        from llm_core.layers.experts import resolve_matmul

        if cfg.quantization == "none" or resolve_matmul(cfg.moe_matmul) == "ragged_dot":
            return None
        return cls(cfg.quantization, cfg.quantization_tile_size)  # the schema allows MODES only

    def wrap(self, matmul: Callable) -> Callable:
        """matmul(x [..., D], stacked kernels [E, D, F]) on quantized operands."""
        mode = MODES[self.mode]

        def quantized(x: jax.Array, kernel: jax.Array) -> jax.Array:
            xq = _straight_through(x, mode["act_qtype"], -1, self.tile_size)
            kq = _straight_through(kernel, mode["weight_qtype"], -2, self.tile_size)
            y = matmul(xq, kq)
            return _e5m2_gradient(y) if "bwd_qtype" in mode else y

        return quantized
