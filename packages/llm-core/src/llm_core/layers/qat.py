"""Quantized training (`quantization: int8 | fp8 | fp8_full`) through qwix.

qwix's `QtProvider` intercepts the `dot_general`s of the modules that match a rule while the model
runs, quantizes both operands (weights per output channel, or per `quantization_tile_size` tile of
the contraction axis; activations per token) and computes the product on the quantized values; its
custom VJP passes gradients straight through the rounding (and, for `fp8_full`, quantizes the
incoming gradients to e5m2 in the backward). Parameters, optimizer state and checkpoints stay in
the float weight dtype.

Quantized: every `Linear` directly under an attention module (q, k, v, o and MLA's projections) and
the dense / shared-expert MLP projections. Not quantized: the attention scores and values (two
activations), the router, the embedding and the output head (their precision decides the loss), and
the MoE routed experts (their grouped products read stacked kernels; not intercepted yet).

qwix intercepts one entry method of the model; ours is `hidden` (the layer stack), which `forward`,
the training loss and the serving engine all go through. We do not use qwix's model-level rule
matching for anything else, and we skip its first eager call (`skip_nnx_init`): without static
activation scales there is nothing to initialise.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

# fullmatch over qwix's module paths ("groups/layer_0/attn/q", "mtp_0/layer/mlp/down", ...)
QUANTIZED_PATHS = r"(.*/)?(attn/[^/]+|mlp/(gate|up|down)|mlp/shared/(gate|up|down))"

MODES = {
    "int8": {"weight_qtype": jnp.int8, "act_qtype": jnp.int8},
    "fp8": {"weight_qtype": jnp.float8_e4m3fn, "act_qtype": jnp.float8_e4m3fn},
    "fp8_full": {
        "weight_qtype": jnp.float8_e4m3fn,
        "act_qtype": jnp.float8_e4m3fn,
        "bwd_qtype": jnp.float8_e5m2,
    },
}


def quantize_for_training(model: nnx.Module, mode: str, tile_size: int = 0) -> nnx.Module:
    """The model with quantized dot_generals in its Linear modules (a copy; see the docstring)."""
    import qwix

    if mode not in MODES:
        raise ValueError(f"quantization={mode!r}: expected one of none, {', '.join(MODES)}")
    rule = qwix.QtRule(
        module_path=QUANTIZED_PATHS,
        op_names=("dot_general",),
        tile_size=tile_size or None,
        **MODES[mode],
    )
    dummy = jnp.zeros((1, 1), jnp.int32)
    return qwix.quantize_model(
        model, qwix.QtProvider([rule]), dummy, methods=("hidden",), skip_nnx_init=True
    )
