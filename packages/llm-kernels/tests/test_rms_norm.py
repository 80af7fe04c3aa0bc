"""rms_norm: the C++ forward/backward kernels against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from kernels_testutil import max_err, rand, scaled_err

import llm_kernels
from llm_kernels import rms_norm, rms_norm_reference

pytestmark = [
    pytest.mark.cpu,
    pytest.mark.skipif(not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"),
]


def _loss(fn):
    return lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * jnp.sin(jnp.arange(x.shape[-1])))


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 64), (100, 48)])
def test_rms_norm_f32(shape):
    rng = np.random.default_rng(0)
    x, w = rand(rng, shape) * 3.0, rand(rng, shape[-1:])
    cpu = lambda x, w: rms_norm(x, w, eps=1e-5, backend="cpu")  # noqa: E731
    ref = lambda x, w: rms_norm_reference(x, w, eps=1e-5)  # noqa: E731
    assert max_err(cpu(x, w), ref(x, w)) < 1e-5
    got = jax.grad(_loss(cpu), argnums=(0, 1))(x, w)
    want = jax.grad(_loss(ref), argnums=(0, 1))(x, w)
    assert max_err(got[0], want[0]) < 1e-5
    assert max_err(got[1], want[1]) < 1e-4  # a sum over up to 100 rows


def test_rms_norm_bf16():
    rng = np.random.default_rng(1)
    x, w = rand(rng, (16, 64), jnp.bfloat16), rand(rng, (64,), jnp.bfloat16)
    y = rms_norm(x, w, backend="cpu")
    assert y.dtype == jnp.bfloat16
    assert scaled_err(y, rms_norm_reference(x, w)) < 1e-2
    got = jax.grad(_loss(lambda x, w: rms_norm(x, w, backend="cpu")), argnums=(0, 1))(x, w)
    want = jax.grad(_loss(rms_norm_reference), argnums=(0, 1))(x, w)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16
    assert all(scaled_err(a, b) < 2e-2 for a, b in zip(got, want))


def test_rms_norm_check_grads():
    rng = np.random.default_rng(2)
    x, w = rand(rng, (4, 16)), rand(rng, (16,))
    check_grads(
        lambda x, w: rms_norm(x, w, backend="cpu"), (x, w), order=1, modes=("rev",),
        atol=1e-2, rtol=1e-2, eps=1e-3,
    )  # fmt: skip


def test_rms_norm_vmap_over_x_and_weight():
    rng = np.random.default_rng(3)
    x, w = rand(rng, (3, 5, 32)), rand(rng, (3, 32))
    fn = jax.jit(jax.vmap(lambda x, w: rms_norm(x, w, backend="cpu")))
    want = jnp.stack([rms_norm_reference(x[i], w[i]) for i in range(3)])
    assert max_err(fn(x, w), want) < 1e-5
    shared = jax.vmap(lambda x: rms_norm(x, w[0], backend="cpu"))(x)
    assert max_err(shared, rms_norm_reference(x, w[0])) < 1e-5
    gw = jax.vmap(jax.grad(_loss(lambda x, w: rms_norm(x, w, backend="cpu")), argnums=1))(x, w)
    gw_ref = jax.vmap(jax.grad(_loss(rms_norm_reference), argnums=1))(x, w)
    assert max_err(gw, gw_ref) < 1e-5


def test_rms_norm_default_backend_uses_cpp_backward():
    rng = np.random.default_rng(4)
    x, w = rand(rng, (6, 40)), rand(rng, (40,))
    grad_fn = jax.grad(_loss(rms_norm), argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad_fn)(x, w))
    assert "llm_kernels_rms_norm_bwd" in jaxpr and "llm_kernels_rms_norm_fwd" not in jaxpr
    want = jax.grad(_loss(rms_norm_reference), argnums=(0, 1))(x, w)
    assert all(max_err(a, b) < 1e-5 for a, b in zip(grad_fn(x, w), want))
    assert max_err(rms_norm(x, w), rms_norm_reference(x, w)) == 0.0


@pytest.mark.parametrize(
    "x_shape,w_shape,dtype,match",
    [
        ((4, 8), (4,), jnp.float32, r"weight must have shape \[x.shape\[-1\]\].*\(4, 8\)"),
        ((4, 8), (4, 8), jnp.float32, r"weight.shape=\(4, 8\)"),
        ((4, 8), (8,), jnp.int32, r"x must be floating.*int32"),
    ],
)
def test_rms_norm_validation(x_shape, w_shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        rms_norm(jnp.ones(x_shape, dtype), jnp.ones(w_shape))
