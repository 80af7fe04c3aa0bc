"""int8_matmul: the C++ kernel against the jnp reference (dequantize, then matmul), forward and
the gradient in x, across row / column counts that do and do not fill the kernel's blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import max_err

import llm_kernels
from llm_kernels import int8_matmul, int8_matmul_reference
from llm_kernels.int8_matmul.ops import CPU_MAX_ROWS

pytestmark = [
    pytest.mark.cpu,
    pytest.mark.skipif(not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"),
]


def operands(rng, lead, k, n):
    x = jnp.asarray(rng.normal(size=(*lead, k)), jnp.float32)
    q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.001, 0.02, n), jnp.float32)
    return x, q, scale


@pytest.mark.parametrize(
    ("lead", "k", "n"),
    [((1,), 64, 32), ((3,), 7, 5), ((9,), 130, 300), ((2, 5), 48, 513), ((40,), 33, 257)],
)
def test_kernel_matches_the_reference_forward_and_gradient(lead, k, n):
    x, q, scale = operands(np.random.default_rng(k + n), lead, k, n)
    got = int8_matmul(x, q, scale, backend="cpu")
    want = int8_matmul_reference(x, q, scale)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    assert max_err(got, want) < 1e-5 * float(jnp.abs(want).max())

    def loss(fn):
        return lambda x: jnp.sum(fn(x, q, scale) * jnp.cos(jnp.arange(n)))

    gx = jax.grad(loss(lambda *a: int8_matmul(*a, backend="cpu")))(x)
    want_gx = jax.grad(loss(int8_matmul_reference))(x)
    assert max_err(gx, want_gx) < 1e-5 * float(jnp.abs(want_gx).max())


def test_default_backend_uses_the_kernel_for_small_batches_only():
    x, q, scale = operands(np.random.default_rng(0), (CPU_MAX_ROWS + 1,), 16, 8)
    small = str(jax.make_jaxpr(lambda x: int8_matmul(x, q, scale))(x[:CPU_MAX_ROWS]))
    large = str(jax.make_jaxpr(lambda x: int8_matmul(x, q, scale))(x))
    assert "llm_kernels_int8_matmul" in small and "llm_kernels_int8_matmul" not in large


def test_jit_and_vmap():
    x, q, scale = operands(np.random.default_rng(2), (4, 3), 24, 40)
    got = jax.jit(jax.vmap(lambda x: int8_matmul(x, q, scale, backend="cpu")))(x)
    assert max_err(got, int8_matmul_reference(x, q, scale)) < 1e-5


@pytest.mark.parametrize(
    ("x_shape", "q", "scale_shape", "match"),
    [
        ((2, 8), jnp.zeros((8, 4), jnp.float32), (4,), "q must be int8"),
        ((2, 7), jnp.zeros((8, 4), jnp.int8), (4,), "x must end in k=8"),
        ((2, 8), jnp.zeros((8, 4), jnp.int8), (5,), "scale must have shape"),
    ],
)
def test_bad_operands_name_the_argument(x_shape, q, scale_shape, match):
    with pytest.raises(ValueError, match=match):
        int8_matmul(jnp.zeros(x_shape), q, jnp.ones(scale_shape))
