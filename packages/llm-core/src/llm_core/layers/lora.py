"""LoRA: low-rank adapters wrapped around `Linear` modules, chosen by a regex over module paths.

`y = base(x) + (alpha / rank) * (x A) B` with A [in..., rank] drawn at random and B [rank, out...]
zero, so a fresh adapter leaves the model unchanged. Adapter weights are `LoRAParam` variables (a
`nnx.Param` subclass): llm-train trains only those and keeps optimizer state only for them. Stacked
(scanned) layers get stacked adapters (the kernel's leading layer axes are kept), so the scan
slices them per layer like every other parameter. The model code never changes: `apply_lora`
replaces matching `Linear` attributes in the module tree (found with `iter_linears`).

Module paths are the attribute paths joined by "/", e.g. `groups/layer_0/attn/q`,
`groups/layer_0/mlp/down`, `lm_head`; the default targets are the attention and MLP projections.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.linear import GroupedLinear, Linear, iter_linears
from llm_core.layers.quantize import Int8Linear, quantize_int8, set_module

DEFAULT_TARGETS = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"


class LoRAParam(nnx.Param):
    """An adapter weight: the only parameters a LoRA run trains."""


class LoRALinear(nnx.Module):
    """A frozen `Linear` plus a trainable low-rank update; same call signature as `Linear`."""

    def __init__(self, base: Linear, rank: int, alpha: float, rngs: nnx.Rngs):
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        kernel = base.kernel
        n_lead = kernel.ndim - len(base.in_shape) - len(base.out_shape)
        self.kernel_dtype = kernel.dtype
        lead = tuple(kernel.shape[:n_lead])
        axes = tuple(getattr(kernel, "out_sharding", None) or (None,) * kernel.ndim)
        lead_axes, in_axes = axes[:n_lead], axes[n_lead : n_lead + len(base.in_shape)]
        out_axes = axes[n_lead + len(base.in_shape) :]
        fan_in = math.prod(base.in_shape)
        a = jax.random.normal(rngs.params(), lead + base.in_shape + (rank,), jnp.float32)
        # adapters stay float32 whatever the base dtype: bf16 would round small updates away
        self.lora_a = LoRAParam(
            a / math.sqrt(fan_in),
            out_sharding=lead_axes + in_axes + (None,),
            eager_sharding=False,
        )
        self.lora_b = LoRAParam(
            jnp.zeros((*lead, rank, *base.out_shape), jnp.float32),
            out_sharding=(*lead_axes, None, *out_axes),
            eager_sharding=False,
        )

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.base.in_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.base.out_shape

    def delta(self, dtype) -> jax.Array:
        """scale * A B, shaped like the base kernel (leading layer axes included)."""
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        n_lead = a.ndim - len(self.base.in_shape) - 1
        lead = tuple(range(n_lead))
        return self.scale * jax.lax.dot_general(a, b, (((a.ndim - 1,), (n_lead,)), (lead, lead)))

    def weight(self, dtype) -> jax.Array:
        """The merged kernel (base + scale * A B), for code that reads weights directly."""
        return self.base.weight(dtype) + self.delta(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.base.in_shape)
        y = self.base(x)
        contract = tuple(range(x.ndim - n_in, x.ndim))
        h = jax.lax.dot_general(
            x, self.lora_a[...].astype(x.dtype), ((contract, tuple(range(n_in))), ((), ()))
        )
        up = jax.lax.dot_general(
            h, self.lora_b[...].astype(x.dtype), (((h.ndim - 1,), (0,)), ((), ()))
        )
        return (y + (self.scale * up).astype(y.dtype)).astype(y.dtype)


def module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def apply_lora(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: str,
    rngs: nnx.Rngs,
    int8_base: bool = False,
) -> int:
    """Wrap every `Linear` whose path matches `targets` (re.search); returns how many. int8_base
    (QLoRA) stores each wrapped base kernel as int8 with per-output-channel scales."""
    pattern = re.compile(targets)
    matched = [(p, lin) for p, lin in iter_linears(model) if pattern.search(module_path(p))]
    chosen = [(p, lin) for p, lin in matched if isinstance(lin, Linear)]
    experts = sorted(module_path(p) for p, lin in matched if isinstance(lin, GroupedLinear))
    if experts:
        import warnings

        warnings.warn(
            f"lora_targets also matches MoE expert weights ({', '.join(experts[:3])}...), which "
            "LoRA does not adapt yet: they stay frozen.",
            stacklevel=2,
        )
    for path, lin in chosen:
        wrapped = LoRALinear(lin, rank, alpha, rngs)
        if int8_base:
            wrapped.base = Int8Linear(lin)
        set_module(model, path, wrapped)
    return len(chosen)


def iter_lora(model: nnx.Module) -> Iterator[tuple[tuple, LoRALinear]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            yield path, node


def _plain_base(base: dict) -> dict:
    """An int8 base {kernel_q, scale[, bias]} seen as {kernel[, bias]} (the int8 values stand in
    for the kernel: same shape)."""
    if "kernel_q" not in base:
        return base
    return {"kernel": base["kernel_q"], **{k: v for k, v in base.items() if k == "bias"}}


def strip_lora(pure: dict) -> dict:
    """A LoRA model's pure parameter dict without adapters: the base model's layout."""
    if not isinstance(pure, dict):
        return pure
    if "base" in pure and "lora_a" in pure:
        return strip_lora(_plain_base(pure["base"]))
    return {k: strip_lora(v) for k, v in pure.items()}


def lift_into_lora(base: dict, target: dict) -> dict:
    """Base-model parameters placed into a LoRA model's layout (`target`), adapters kept; kernels
    of int8 bases (QLoRA) are quantized on the way."""
    if not isinstance(target, dict):
        return base
    if "base" in target and "lora_a" in target:
        tb = target["base"]
        if "kernel_q" in tb:
            n_in = tb["kernel_q"].ndim - tb["scale"].ndim
            n_lead = _lead_axes(target["lora_a"], n_in)
            q, scale = quantize_int8(base["kernel"], n_lead, n_in)
            lifted = {"kernel_q": q, "scale": scale}
            if "bias" in tb:
                lifted["bias"] = base["bias"]
            return {**target, "base": lifted}
        return {**target, "base": lift_into_lora(base, tb)}
    return {k: lift_into_lora(base[k], v) for k, v in target.items()}


def _lead_axes(lora_a, n_in: int) -> int:
    """Leading (layer) axes of an adapter A [lead..., in..., rank]."""
    return lora_a.ndim - n_in - 1


def merged_params(model: nnx.Module) -> dict:
    """The parameters of the same model without LoRA (pure dict): every adapter folded into its
    base kernel, adapters and the `base/` level removed. The model itself is not changed."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path, lora in iter_lora(model):
        node = pure
        for key in path:
            node = node[key]
        node["base"] = {k: v for k, v in node["base"].items() if k not in ("kernel_q", "scale")}
        node["base"]["kernel"] = lora.weight(lora.kernel_dtype)
    return strip_lora(pure)
