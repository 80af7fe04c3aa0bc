"""The gated activation's hand-written backward against autodiff of the plain expression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_core.layers.mlp import ACTIVATIONS, gated


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_matches_autodiff(name, dtype):
    act = ACTIVATIONS[name]
    kg, ku, kw = jax.random.split(jax.random.key(0), 3)
    gate = (3 * jax.random.normal(kg, (4, 16, 24))).astype(dtype)
    up = jax.random.normal(ku, (4, 16, 24)).astype(dtype)
    weight = jax.random.normal(kw, (4, 16, 24)).astype(dtype)

    def loss(fn, g, u):
        return jnp.sum((fn(g, u) * weight).astype(jnp.float32))

    ours = jax.jit(
        jax.value_and_grad(lambda g, u: loss(lambda a, b: gated(act, a, b), g, u), (0, 1))
    )
    plain = jax.value_and_grad(lambda g, u: loss(lambda a, b: act(a) * b, g, u), (0, 1))
    (v1, (dg1, du1)), (v2, (dg2, du2)) = ours(gate, up), plain(gate, up)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(float(v1), float(v2), rtol=tol)
    for a, b in ((dg1, dg2), (du1, du2)):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
