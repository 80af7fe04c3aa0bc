"""Quantized training of the routed experts outside qwix (`ExpertQuantization`): the rounding
matches numpy's, every `moe_matmul` method and the capacity buffer compute the product of rounded
operands (against a per-token, per-expert loop that rounds each row and each expert's kernel on its
own), gradients pass straight through, and fp8_full's backward runs on e5m2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import load_config
from llm_core.layers.moe import MoE
from llm_core.layers.qat import fake_quantize

TINY_MOE = [
    "emb_dim=32", "num_heads=4", "num_kv_heads=2", "head_dim=8", "vocab_size=64",
    "ffn_kind=moe", "num_experts=4", "num_experts_per_tok=2", "moe_mlp_dim=24",
]  # fmt: skip


def _moe(*extra) -> MoE:
    return MoE(load_config(None, [*TINY_MOE, *extra]), rngs=nnx.Rngs(0))


def _int8(a: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric absmax int8 rounding along `axis`, back in float32."""
    scale = np.abs(a).max(axis=axis, keepdims=True) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    return (np.clip(np.round(a / scale), -127, 127) * scale).astype(np.float32)


def test_fake_quantize_rounds_along_the_contraction_axis():
    a = np.asarray(jax.random.normal(jax.random.key(0), (4, 32, 24)))
    ours = np.asarray(fake_quantize(jnp.asarray(a), jnp.int8, axis=1))
    np.testing.assert_allclose(ours, _int8(a, 1), rtol=0, atol=1e-6)
    assert not np.allclose(ours, _int8(a, 2), rtol=0, atol=1e-3)


def _quantized_loop_reference(moe: MoE, x) -> np.ndarray:
    """Per token and expert: the token rounded alone, each expert's kernel rounded alone
    (per output channel), the hidden row again before the down projection."""

    def rounded(a, axis):
        return np.asarray(fake_quantize(jnp.asarray(a), jnp.int8, axis))

    tokens = np.asarray(x.reshape(-1, x.shape[-1]), np.float32)
    logits = tokens @ np.asarray(moe.router.kernel[...])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kernels = [np.asarray(m.kernel[...]) for m in (moe.gate, moe.up, moe.down)]
    gate, up, down = ([rounded(k[e], 0) for e in range(len(k))] for k in kernels)
    out = np.zeros_like(tokens)
    for t, row in enumerate(tokens):
        top = np.argsort(-probs[t], kind="stable")[: moe.routing.k]
        w = probs[t, top] / probs[t, top].sum()
        q = rounded(row, 0)
        for weight, e in zip(w, top, strict=True):
            h = q @ gate[e]
            h = h / (1 + np.exp(-h)) * (q @ up[e])
            out[t] += weight * (rounded(h, 0) @ down[e])
    return out.reshape(x.shape)


# 40 tokens x 2 choices / 4 experts = 20 rows per expert: the tiled path takes 32-row tiles
CASES = [
    ("moe_matmul=grouped_matmul",),
    ("moe_matmul=tiled",),
    ("moe_matmul=dense",),
    ("moe_matmul=tiled", "moe_capacity_factor=4.0"),
]


@pytest.mark.parametrize("extra", CASES, ids=lambda c: "-".join(c))
def test_quantized_experts_multiply_rounded_operands(extra):
    quantized = _moe("quantization=int8", *extra)
    plain = _moe(*extra)
    assert quantized.quant is not None and plain.quant is None
    x = jax.random.normal(jax.random.key(1), (2, 20, 32))
    y, _ = quantized(x)
    reference = _quantized_loop_reference(quantized, x)
    np.testing.assert_allclose(y, reference, atol=1e-8, rtol=1e-5)  # outputs ~1e-3
    float_error = np.abs(np.asarray(plain(x)[0]) - reference).max()
    assert float_error > 1000 * np.abs(np.asarray(y) - reference).max()  # the rounding is real


def test_ragged_dot_experts_are_left_to_qwix():
    assert _moe("quantization=int8", "moe_matmul=ragged_dot").quant is None


def _loss_and_grads(moe: MoE, x):
    graphdef, state = nnx.split(moe)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)[0]))

    return jax.value_and_grad(loss, argnums=(0, 1))(state, x)


@pytest.mark.parametrize("mode", ["int8", "fp8_full"])
def test_gradients_pass_straight_through(mode):
    """The quantized gradients stay close to the float ones (the rounding has no zero gradient)."""
    x = jax.random.normal(jax.random.key(2), (1, 30, 32))
    _, (g_q, gx_q) = _loss_and_grads(_moe(f"quantization={mode}", "moe_matmul=grouped_matmul"), x)
    _, (g_f, gx_f) = _loss_and_grads(_moe("moe_matmul=grouped_matmul"), x)
    for name in ("gate", "up", "down"):
        a, b = np.asarray(g_q[name]["kernel"][...]), np.asarray(g_f[name]["kernel"][...])
        assert np.linalg.norm(a - b) < 0.1 * np.linalg.norm(b), name
        assert not np.array_equal(a, b)
    assert np.linalg.norm(gx_q - gx_f) < 0.1 * np.linalg.norm(gx_f)


def test_fp8_full_backward_rounds_gradients_to_e5m2():
    x = jax.ShapeDtypeStruct((1, 30, 32), jnp.float32)

    def grad_jaxpr(*extra) -> str:
        moe = _moe(*extra, "moe_matmul=tiled")
        return str(jax.make_jaxpr(lambda x: _loss_and_grads(moe, x))(x))

    full, fwd_only = grad_jaxpr("quantization=fp8_full"), grad_jaxpr("quantization=fp8")
    assert "f8_e4m3fn" in full and "f8_e5m2" in full
    assert "f8_e4m3fn" in fwd_only and "f8_e5m2" not in fwd_only
    assert "f8_" not in grad_jaxpr()


def test_tile_size_gives_one_scale_per_contraction_tile():
    """With quantization_tile_size=8 each row's 8-wide slices get their own scales: closer to
    float than one scale per row."""
    x = jax.random.normal(jax.random.key(3), (1, 30, 32)) * jnp.linspace(0.01, 3.0, 32)
    plain = np.asarray(_moe("moe_matmul=grouped_matmul")(x)[0])
    per_row = np.asarray(_moe("quantization=int8", "moe_matmul=grouped_matmul")(x)[0])
    tiled = _moe("quantization=int8", "quantization_tile_size=8", "moe_matmul=grouped_matmul")
    per_tile = np.asarray(tiled(x)[0])
    assert 0 < np.abs(per_tile - plain).max() < np.abs(per_row - plain).max()
