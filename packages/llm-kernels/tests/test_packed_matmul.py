"""packed_matmul: the C++ kernel on panel-packed weights (float32 and bfloat16) against the jnp
reference, forward and the gradient in x, across row counts that fill the kernel's 8 / 4 / 2 / 1-row blocks or not and column
counts that fill the last 32-column panel or not; packing round trips; bad operands are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import max_err

import llm_kernels
from llm_kernels import pack_panels, packed_matmul, packed_matmul_reference, unpack_panels

pytestmark = [
    pytest.mark.cpu,
    pytest.mark.skipif(not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"),
]


def operands(rng, lead, k, n):
    x = jnp.asarray(rng.normal(size=(*lead, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
    return x, w


@pytest.mark.parametrize(
    ("lead", "k", "n"),
    [((1,), 64, 32), ((3,), 7, 5), ((15,), 130, 300), ((2, 5), 48, 513), ((40,), 512, 1408)],
)
def test_kernel_matches_the_reference_forward_and_gradient(lead, k, n):
    x, w = operands(np.random.default_rng(k + n), lead, k, n)
    panels = pack_panels(w)
    got = jax.jit(lambda x: packed_matmul(x, panels, n, backend="cpu"))(x)
    want = x @ w
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    assert max_err(got, want) < 1e-5 * float(jnp.abs(want).max())
    np.testing.assert_allclose(packed_matmul_reference(x, panels, n), want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x: jnp.sum(fn(x) * jnp.cos(jnp.arange(n)))

    gx = jax.grad(loss(lambda x: packed_matmul(x, panels, n, backend="cpu")))(x)
    want_gx = jax.grad(loss(lambda x: x @ w))(x)
    assert max_err(gx, want_gx) < 1e-5 * float(jnp.abs(want_gx).max())


@pytest.mark.parametrize(("lead", "k", "n"), [((1,), 64, 32), ((3,), 7, 5), ((11,), 130, 300)])
def test_bfloat16_panels_match_the_widened_weight(lead, k, n):
    """bfloat16 panels: the kernel widens each weight exactly, so it matches x @ float32(w_bf16)."""
    x, w = operands(np.random.default_rng(k * n), lead, k, n)
    w16 = w.astype(jnp.bfloat16)
    panels = pack_panels(w16)
    assert panels.dtype == jnp.bfloat16
    got = jax.jit(lambda x: packed_matmul(x, panels, n, backend="cpu"))(x)
    want = x @ w16.astype(jnp.float32)
    assert got.dtype == jnp.float32
    assert max_err(got, want) < 1e-5 * float(jnp.abs(want).max())
    assert max_err(packed_matmul_reference(x, panels, n), want) < 1e-5 * float(jnp.abs(want).max())
    assert "llm_kernels_packed_matmul_bf16" in str(
        jax.make_jaxpr(lambda x: packed_matmul(x, panels, n))(x)
    )
    gx = jax.grad(lambda x: jnp.sum(packed_matmul(x, panels, n, backend="cpu") ** 2))(x)
    want_gx = jax.grad(lambda x: jnp.sum((x @ w16.astype(jnp.float32)) ** 2))(x)
    assert max_err(gx, want_gx) < 1e-5 * float(jnp.abs(want_gx).max())


def test_packing_round_trips_and_pads_the_last_panel_with_zeros():
    w = jnp.arange(5 * 70, dtype=jnp.float32).reshape(5, 70)
    panels = pack_panels(w)
    assert panels.shape == (3, 5, 32)
    np.testing.assert_array_equal(panels[1, 2], w[2, 32:64])
    assert not jnp.any(panels[2, :, 6:])
    np.testing.assert_array_equal(unpack_panels(panels, 70), w)


def test_default_backend_is_the_kernel_on_the_cpu():
    x, w = operands(np.random.default_rng(0), (4,), 16, 40)
    jaxpr = str(jax.make_jaxpr(lambda x: packed_matmul(x, pack_panels(w), 40))(x))
    assert "llm_kernels_packed_matmul" in jaxpr


def test_bad_operands_are_refused_by_name():
    x, w = operands(np.random.default_rng(0), (2,), 16, 40)
    panels = pack_panels(w)
    with pytest.raises(ValueError, match="k=16"):
        packed_matmul(x[:, :8], panels, 40)
    with pytest.raises(ValueError, match="n=70"):
        packed_matmul(x, panels, 70)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        packed_matmul(x, panels.astype(jnp.float16), 40)
    with pytest.raises(ValueError, match="backend"):
        packed_matmul(x, panels, 40, backend="tpu")
