"""Quantized training (`quantization: int8 | fp8 | fp8_full`) through qwix.

qwix's `QtProvider` intercepts the `dot_general`s of the modules that match a rule while the model
runs, quantizes both operands (weights per output channel, or per `quantization_tile_size` tile of
the contraction axis; activations per token) and computes the product on the quantized values; its
custom VJP passes gradients straight through the rounding (and, for `fp8_full`, quantizes the
incoming gradients to e5m2 in the backward). Parameters, optimizer state and checkpoints stay in
the float weight dtype.

Quantized: every `Linear` directly under an attention module (q, k, v, o and MLA's projections),
the dense / shared-expert MLP projections, and the MoE routed experts when they run as
`jax.lax.ragged_dot` (`moe_matmul: ragged_dot`; qwix's ragged_dot takes the stacked expert kernels
as the weight). Not quantized: the attention scores and values (two activations), the router, the
embedding and the output head (their precision decides the loss), and the routed experts under the
other `moe_matmul` methods (a warning says so).

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
EXPERT_PATHS = r"(.*/)?mlp"  # the MoE module, where the expert products run

MODES = {
    "int8": {"weight_qtype": jnp.int8, "act_qtype": jnp.int8},
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
    if cfg.num_experts > 0:
        method = resolve_matmul(cfg.moe_matmul)
        if method == "ragged_dot":
            rules.append(
                qwix.QtRule(module_path=EXPERT_PATHS, op_names=("ragged_dot",), **settings)
            )
        else:
            import warnings

            warnings.warn(
                f"quantization={mode} leaves the MoE routed experts in float with moe_matmul="
                f"{method}: set moe_matmul=ragged_dot to quantize them too.",
                stacklevel=3,
            )
    dummy = jnp.zeros((1, 1), jnp.int32)
    return qwix.quantize_model(
        model, qwix.QtProvider(rules), dummy, methods=("hidden",), skip_nnx_init=True
    )
