"""int4_matmul: the C++ kernel against the jnp reference (unpack, dequantize, then matmul), forward
and the gradient in x, across row / column counts and group sizes that do and do not fill the
kernel's blocks; the packing convention against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import max_err

import llm_kernels
from llm_kernels import int4_matmul, int4_matmul_reference
from llm_kernels.int4_matmul import dequantize_int4
from llm_kernels.int4_matmul.ops import CPU_MAX_ROWS

pytestmark = [
    pytest.mark.cpu,
    pytest.mark.skipif(not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"),
]


def operands(rng, lead, k, n, group):
    """x, the packed weights, their scales, and the float weights they stand for (numpy)."""
    x = jnp.asarray(rng.normal(size=(*lead, k)), jnp.float32)
    values = rng.integers(-8, 8, (k, n))
    scale = rng.uniform(0.001, 0.02, (k // group, n)).astype(np.float32)
    nibbles = (values & 0xF).astype(np.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    weights = values.astype(np.float32) * np.repeat(scale, group, axis=0)
    return x, jnp.asarray(packed), jnp.asarray(scale), weights


def test_packing_is_low_nibble_first_two_rows_per_byte():
    _, q, scale, weights = operands(np.random.default_rng(0), (1,), 16, 3, 4)
    np.testing.assert_allclose(dequantize_int4(q, scale), weights, rtol=1e-6)


@pytest.mark.parametrize(
    ("lead", "k", "n", "group"),
    [
        ((1,), 64, 32, 32),
        ((3,), 8, 5, 2),
        ((9,), 256, 300, 128),
        ((2, 5), 48, 513, 16),
        ((40,), 34, 257, 34),
    ],
)
def test_kernel_matches_the_reference_forward_and_gradient(lead, k, n, group):
    x, q, scale, weights = operands(np.random.default_rng(k + n), lead, k, n, group)
    got = int4_matmul(x, q, scale, backend="cpu")
    want = int4_matmul_reference(x, q, scale)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    assert max_err(got, want) < 1e-5 * float(jnp.abs(want).max())
    assert max_err(want, np.asarray(x) @ weights) < 1e-5 * float(jnp.abs(want).max())

    def loss(fn):
        return lambda x: jnp.sum(fn(x, q, scale) * jnp.cos(jnp.arange(n)))

    gx = jax.grad(loss(lambda *a: int4_matmul(*a, backend="cpu")))(x)
    want_gx = jax.grad(loss(int4_matmul_reference))(x)
    assert max_err(gx, want_gx) < 1e-5 * float(jnp.abs(want_gx).max())


def test_default_backend_uses_the_kernel_for_small_batches_only():
    x, q, scale, _ = operands(np.random.default_rng(1), (CPU_MAX_ROWS + 1,), 16, 8, 8)
    small = str(jax.make_jaxpr(lambda x: int4_matmul(x, q, scale))(x[:CPU_MAX_ROWS]))
    large = str(jax.make_jaxpr(lambda x: int4_matmul(x, q, scale))(x))
    assert "llm_kernels_int4_matmul" in small and "llm_kernels_int4_matmul" not in large


def test_jit_and_vmap():
    x, q, scale, _ = operands(np.random.default_rng(2), (4, 3), 24, 40, 8)
    got = jax.jit(jax.vmap(lambda x: int4_matmul(x, q, scale, backend="cpu")))(x)
    assert max_err(got, int4_matmul_reference(x, q, scale)) < 1e-5


@pytest.mark.parametrize(
    ("x_shape", "q", "scale_shape", "match"),
    [
        ((2, 8), jnp.zeros((4, 4), jnp.int8), (1, 4), "q must be uint8"),
        ((2, 7), jnp.zeros((4, 4), jnp.uint8), (1, 4), "x must end in k=8"),
        ((2, 8), jnp.zeros((4, 4), jnp.uint8), (1, 5), "scale must have shape"),
        ((2, 8), jnp.zeros((4, 4), jnp.uint8), (3, 4), "3 scale groups"),
        ((2, 8), jnp.zeros((4, 4), jnp.uint8), (8, 4), "8 scale groups"),
    ],
)
def test_bad_operands_name_the_argument(x_shape, q, scale_shape, match):
    with pytest.raises(ValueError, match=match):
        int4_matmul(jnp.zeros(x_shape), q, jnp.ones(scale_shape))
