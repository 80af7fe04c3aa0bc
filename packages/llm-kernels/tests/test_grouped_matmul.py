"""grouped_matmul: the C++ CPU kernel and the reference wiring, forward and gradients.

Shapes cross the CPU kernel's blocking (k > KC = 256, n > NC = 256, m not a multiple of the
6- or 12-row micro-tile) so every packing edge runs. The Pallas kernels are in
test_grouped_matmul_pallas.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from kernels_testutil import max_err, rand, scaled_err

import llm_kernels
from llm_kernels.grouped_matmul import gmm_reference, grouped_matmul, tgmm_reference

pytestmark = pytest.mark.cpu

needs_cpu_kernels = pytest.mark.skipif(
    not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"
)

F32_TOL = 2e-4  # relative to max |reference|: float32 sums of up to 300 products
BF16_TOL = 2e-2

# (m, k, n, group sizes): empty groups, one group holding every row, padding rows past the groups
CASES = {
    "mixed": (77, 300, 270, [20, 0, 33, 24]),
    "one-group-all-rows": (50, 40, 24, [0, 50, 0]),
    "padding-rows": (61, 17, 9, [10, 25, 0, 3]),
    "small": (5, 3, 7, [2, 3]),
}


def _operands(case, transpose_rhs, dtype=jnp.float32, seed=0):
    m, k, n, sizes = CASES[case]
    rng = np.random.default_rng(seed)
    lhs = rand(rng, (m, k), dtype)
    rhs = rand(rng, (len(sizes), n, k) if transpose_rhs else (len(sizes), k, n), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _loss(backend, group_sizes, transpose_rhs, proj):
    def loss(lhs, rhs):
        out = grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * proj)

    return loss


@needs_cpu_kernels
@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_forward_and_grads_match_reference(case, transpose_rhs, dtype):
    lhs, rhs, sizes = _operands(case, transpose_rhs, dtype)
    out = grouped_matmul(lhs, rhs, sizes, transpose_rhs=transpose_rhs, backend="cpu")
    ref = gmm_reference(lhs, rhs, sizes, transpose_rhs=transpose_rhs)
    assert out.dtype == ref.dtype == dtype
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert scaled_err(out, ref) < tol
    used = int(sizes.sum())
    assert float(jnp.abs(out[used:]).max(initial=0.0)) == 0.0  # padding rows are exact zeros

    proj = jnp.cos(jnp.arange(out.shape[1], dtype=jnp.float32) * 0.7)
    g_cpu = jax.grad(_loss("cpu", sizes, transpose_rhs, proj), argnums=(0, 1))(lhs, rhs)
    g_ref = jax.grad(_loss("reference", sizes, transpose_rhs, proj), argnums=(0, 1))(lhs, rhs)
    for got, want, name in zip(g_cpu, g_ref, ("d-lhs", "d-rhs"), strict=True):
        assert got.dtype == want.dtype == dtype, name
        assert scaled_err(got, want) < tol, name
    assert float(jnp.abs(g_cpu[0][used:]).max(initial=0.0)) == 0.0  # padding rows get no grad


@needs_cpu_kernels
def test_cpu_kernel_check_grads():
    """Numerical derivatives of the C++ path (custom_vjp) in both directions, float32."""
    lhs, rhs, sizes = _operands("padding-rows", False)

    def f(lhs, rhs):
        return grouped_matmul(lhs, rhs, sizes, backend="cpu")

    check_grads(f, (lhs, rhs), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)


@needs_cpu_kernels
def test_empty_group_gets_zero_rhs_gradient():
    lhs, rhs, sizes = _operands("mixed", False)
    drhs = jax.grad(lambda r: jnp.sum(grouped_matmul(lhs, r, sizes, backend="cpu") ** 2))(rhs)
    assert float(jnp.abs(drhs[1]).max()) == 0.0
    assert float(jnp.abs(drhs[0]).max()) > 0.0


@needs_cpu_kernels
def test_cpu_under_vmap_and_jit():
    rng = np.random.default_rng(3)
    lhs = rand(rng, (3, 20, 16))
    rhs = rand(rng, (3, 4, 16, 12))
    sizes = jnp.asarray([[5, 5, 5, 5], [0, 20, 0, 0], [1, 2, 3, 4]], jnp.int32)

    def run(backend):
        return jax.jit(jax.vmap(lambda a, b, s: grouped_matmul(a, b, s, backend=backend)))(
            lhs, rhs, sizes
        )

    assert max_err(run("cpu"), run("reference")) < 1e-4


def test_tgmm_reference_is_the_ragged_dot_rhs_gradient():
    lhs, rhs, sizes = _operands("mixed", False)
    dout = rand(np.random.default_rng(1), (lhs.shape[0], rhs.shape[2]))
    _, vjp = jax.vjp(lambda r: jax.lax.ragged_dot(lhs, r, sizes), rhs)
    assert scaled_err(tgmm_reference(lhs, dout, sizes), vjp(dout)[0]) < 1e-5


def test_default_backend_on_cpu_is_the_cpu_kernel_when_built():
    from llm_kernels.grouped_matmul.ops import resolve_backend

    expected = "cpu" if llm_kernels.cpu_kernels_available() else "reference"
    assert resolve_backend(None, interpret=False) == expected


@pytest.mark.parametrize(
    ("lhs_shape", "rhs_shape", "sizes", "kwargs", "match"),
    [
        ((4, 3, 2), (2, 2, 5), [2, 2], {}, r"lhs must be 2-D .* lhs.shape=\(4, 3, 2\)"),
        ((4, 3), (3, 5), [2, 2], {}, r"rhs must be 3-D .* rhs.shape=\(3, 5\)"),
        ((4, 3), (2, 4, 5), [2, 2], {}, r"contracting .* k=3, .* k=4 "),
        ((4, 3), (2, 5, 4), [2, 2], {"transpose_rhs": True}, r"contracting .*transpose_rhs=True"),
        ((4, 3), (2, 3, 5), [2, 1, 1], {}, r"group_sizes must have shape \[groups\] = \[2\]"),
        ((4, 3), (2, 3, 5), [3, 2], {}, r"sum\(group_sizes\) = 5 exceeds the 4 rows"),
        ((4, 3), (2, 3, 5), [2, 2], {"backend": "cuda"}, r"unknown backend 'cuda'"),
    ],
)
def test_bad_arguments_name_the_argument(lhs_shape, rhs_shape, sizes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grouped_matmul(
            jnp.zeros(lhs_shape), jnp.zeros(rhs_shape), jnp.asarray(sizes, jnp.int32), **kwargs
        )


def test_group_sizes_must_be_int32():
    with pytest.raises(
        ValueError, match=r"group_sizes must be int32, got group_sizes.dtype=float32"
    ):
        grouped_matmul(jnp.zeros((4, 3)), jnp.zeros((2, 3, 5)), jnp.asarray([2.0, 2.0]))
