"""LoRA: low-rank adapters wrapped around `Linear` modules, chosen by a regex over module paths.

`y = base(x) + (alpha / rank) * (x A) B` with A [in..., rank] drawn at random and B [rank, out...]
zero, so a fresh adapter leaves the model unchanged. Adapter weights are `LoRAParam` variables (a
`nnx.Param` subclass): llm-train trains only those and keeps optimizer state only for them. Stacked
(scanned) layers get stacked adapters (the kernel's leading layer axes are kept), so the scan
slices them per layer like every other parameter. The model code never changes: `apply_lora`
replaces matching `Linear` attributes in the module tree (found with `iter_linears`).

Module paths are the attribute paths joined by "/", e.g. `groups/layer_0/attn/q`,
`groups/layer_0/mlp/down`, `lm_head`; the default targets are the attention and MLP projections.

MoE expert weights (`GroupedLinear`, at `.../mlp/gate|up|down` of MoE layers) get per-expert
adapters A [experts, in, rank], B [experts, rank, out] when `lora_experts` is on: the expert
products read their kernels through `weight()`, so the adapter is folded into the expert kernels
inside the step (one transient kernel-sized array per projection), which works with every expert
matmul and with expert parallelism.

Dropout (`lora_dropout` p, as in PEFT: y = base(x) + scale * dropout(x) A B) is active only inside
`lora_dropout_key(key)`, which the train step opens; evaluation, serving and export never see it.
Each adapter (and each stacked layer of it) folds its own `LoRASalt` into the key, so masks differ
between modules and layers. Expert adapters are merged into the kernels, so dropout does not apply
to them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from llm_core.layers.linear import GroupedLinear, Linear, flat_product, iter_linears
from llm_core.layers.quantize import Int8Linear, quantize_int8, set_module

DEFAULT_TARGETS = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"


class LoRAParam(nnx.Param):
    """An adapter weight: the only parameters a LoRA run trains."""


class LoRASalt(nnx.Variable):
    """Per-adapter (per stacked layer) integer folded into the dropout key: not trained."""


_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def lora_dropout_key(key):
    """Within this block (while tracing a train step), adapters with dropout > 0 drop inputs with
    masks drawn from `key` (a jax.random key; None: no dropout)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def _salts(lead: tuple[int, ...], index: int) -> LoRASalt:
    n = math.prod(lead)
    values = jnp.arange(index * n, (index + 1) * n, dtype=jnp.uint32).reshape(lead)
    return LoRASalt(values)


class LoRALinear(nnx.Module):
    """A frozen `Linear` plus a trainable low-rank update; same call signature as `Linear`."""

    def __init__(
        self,
        base: Linear,
        rank: int,
        alpha: float,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        index: int = 0,
    ):
        self.base = base
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        kernel = base.kernel
        n_lead = kernel.ndim - len(base.in_shape) - len(base.out_shape)
        self.salt = _salts(tuple(kernel.shape[:n_lead]), index)
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
        key = _DROPOUT_KEY.get()
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(
                jax.random.fold_in(key, self.salt[...]), 1.0 - self.dropout, x.shape
            )
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = flat_product(x, self.lora_a[...].astype(x.dtype), n_in, x.dtype)
        up = flat_product(h, self.lora_b[...].astype(x.dtype), 1, x.dtype)
        return (y + (self.scale * up).astype(y.dtype)).astype(y.dtype)


class LoRAGroupedLinear(nnx.Module):
    """A frozen `GroupedLinear` (MoE experts) plus a trainable low-rank update per expert, read
    through the same `weight` / `bias_of` interface."""

    def __init__(self, base: GroupedLinear, rank: int, alpha: float, rngs: nnx.Rngs):
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        kernel = base.kernel
        self.kernel_dtype = kernel.dtype
        *lead, experts, fan_in, fan_out = kernel.shape
        axes = tuple(getattr(kernel, "out_sharding", None) or (None,) * kernel.ndim)
        a = jax.random.normal(rngs.params(), (*lead, experts, fan_in, rank), jnp.float32)
        self.lora_a = LoRAParam(
            a / math.sqrt(fan_in), out_sharding=(*axes[:-1], None), eager_sharding=False
        )
        self.lora_b = LoRAParam(
            jnp.zeros((*lead, experts, rank, fan_out), jnp.float32),
            out_sharding=(*axes[:-2], None, axes[-1]),
            eager_sharding=False,
        )

    def delta(self, dtype) -> jax.Array:
        """scale * A_e B_e for every expert e, shaped like the base kernel."""
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        return self.scale * jnp.einsum("...ir,...ro->...io", a, b)

    def weight(self, dtype) -> jax.Array:
        return self.base.weight(dtype) + self.delta(dtype)

    def bias_of(self, dtype) -> jax.Array | None:
        return self.base.bias_of(dtype)


def module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def apply_lora(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: str,
    rngs: nnx.Rngs,
    int8_base: bool = False,
    *,
    dropout: float = 0.0,
    experts: bool = False,
) -> int:
    """Wrap every `Linear` whose path matches `targets` (re.search), and with `experts` every
    matching MoE `GroupedLinear`; returns how many. int8_base (QLoRA) stores each wrapped dense
    base kernel as int8 with per-output-channel scales (expert kernels stay as they are)."""
    pattern = re.compile(targets)
    matched = [(p, lin) for p, lin in iter_linears(model) if pattern.search(module_path(p))]
    grouped = [(p, lin) for p, lin in matched if isinstance(lin, GroupedLinear)]
    if grouped and not experts:
        import warnings

        names = ", ".join(sorted(module_path(p) for p, _ in grouped)[:3])
        warnings.warn(
            f"lora_targets also matches MoE expert weights ({names}...), which stay frozen: set "
            "lora_experts=true to adapt them too.",
            stacklevel=2,
        )
    count = 0
    for index, (path, lin) in enumerate(matched):
        if isinstance(lin, GroupedLinear):
            if experts:
                set_module(model, path, LoRAGroupedLinear(lin, rank, alpha, rngs))
                count += 1
            continue
        if not isinstance(lin, Linear):
            continue
        wrapped = LoRALinear(lin, rank, alpha, rngs, dropout, index)
        if int8_base:
            wrapped.base = Int8Linear(lin)
        set_module(model, path, wrapped)
        count += 1
    return count


def iter_lora(model: nnx.Module) -> Iterator[tuple[tuple, LoRALinear | LoRAGroupedLinear]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear | LoRAGroupedLinear):
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
