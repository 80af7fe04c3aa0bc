"""`flat_product` (every Linear's matmul) against a plain einsum, and the layout it exists for."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_core.layers.linear import flat_product


@pytest.mark.parametrize(
    "x_shape, w_shape, n_in, spec",
    [
        ((3, 5, 8), (8, 4, 6), 1, "bse,ehd->bshd"),  # [batch, seq] x -> heads
        ((3, 5, 4, 6), (4, 6, 8), 2, "bshd,hde->bse"),  # heads -> embed
        ((7, 8), (8, 6), 1, "ne,ev->nv"),  # one leading axis: no reshape
        ((2, 3, 5, 8), (8, 6), 1, "abce,ev->abcv"),
    ],
)
def test_flat_product_matches_einsum(x_shape, w_shape, n_in, spec):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)
    out_shape = jnp.einsum(spec, x, w).shape
    g = jax.random.normal(kg, out_shape)

    def loss(fn, x, w):
        return jnp.sum(fn(x, w) * g)

    ours = jax.value_and_grad(
        lambda x, w: loss(lambda a, b: flat_product(a, b, n_in, jnp.float32), x, w), (0, 1)
    )
    plain = jax.value_and_grad(lambda x, w: loss(partial_einsum(spec), x, w), (0, 1))
    (v1, (dx1, dw1)), (v2, (dx2, dw2)) = jax.jit(ours)(x, w), plain(x, w)
    assert flat_product(x, w, n_in, jnp.float32).shape == out_shape
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-5)


def partial_einsum(spec):
    return lambda a, b: jnp.einsum(spec, a, b)


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="XLA:CPU's layout choice")
def test_weight_gradient_reads_the_output_gradient_in_place():
    """The reason for merging the leading axes: with [batch, seq] kept apart, XLA:CPU wrote the
    output head's [vocab, tokens] transposed gradient before the weight-gradient matmul."""
    b, s, e, v = 2, 64, 32, 4000
    x = jnp.ones((b, s, e))
    w = jnp.ones((e, v))

    def loss(w):
        return jnp.sum(jax.nn.logsumexp(flat_product(x, w, 1, jnp.float32), axis=-1))

    hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    transposed = re.findall(rf"f32\[{v},{b * s}\]", hlo)
    assert not transposed, f"a [{v}, {b * s}] transposed copy of the logits' gradient: {hlo}"
