"""The Pallas TPU (Mosaic) and GPU (Triton) grouped matmuls in interpret mode, against the reference.

Each case checks the forward and both gradients (d-lhs through gmm, d-rhs through tgmm) of the
public op in one go against autodiff of `gmm_reference` (jax.lax.ragged_dot). Tiles are shrunk to
16 so that tiny shapes still span several tiles and groups straddle tile boundaries.
Errors are `scaled_err` (max |diff| / max(1, max |reference|)): 1e-5 for float32, 2e-2 for bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import rand, scaled_err

from llm_kernels.grouped_matmul import gmm_reference, grouped_matmul, pallas_gpu, pallas_tpu

pytestmark = pytest.mark.cpu

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
BACKENDS = ["pallas_tpu", "pallas_gpu"]

# (m, k, n, group_sizes, transpose_rhs, dtype); sum(group_sizes) < m leaves padding rows.
CASES = {
    "f32-empty-groups-odd-m": (45, 24, 40, [10, 0, 20, 15, 0], False, jnp.float32),
    "f32-one-group-all-rows": (40, 16, 16, [0, 40, 0], False, jnp.float32),
    "f32-transpose-rhs": (53, 48, 24, [13, 0, 25, 15], True, jnp.float32),
    "f32-padding-rows": (64, 24, 16, [9, 30, 0, 11], False, jnp.float32),
    "bf16": (48, 32, 24, [7, 20, 0, 21], False, jnp.bfloat16),
    "bf16-transpose-padding-rows": (56, 16, 32, [5, 0, 30, 9], True, jnp.bfloat16),
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    for module in (pallas_tpu, pallas_gpu):
        monkeypatch.setattr(module, "TILING", (16, 16, 16))


def _value_and_grads(fn, lhs, rhs, sizes, proj):
    """(out, d-lhs, d-rhs) of sum(fn(...) * proj): a fixed random projection, not just a sum."""

    def loss(lhs, rhs):
        out = fn(lhs, rhs, sizes)
        return jnp.sum(out.astype(jnp.float32) * proj), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
    return (out, *grads)


def _check(got, want, dtype, used_rows: int):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert scaled_err(a, b) < TOL[dtype]
    out, dlhs = got[0], got[1]
    assert not jnp.any(out[..., used_rows:, :]), "rows past sum(group_sizes) must be exactly 0"
    assert not jnp.any(dlhs[..., used_rows:, :]), "their d-lhs must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads(backend, case):
    m, k, n, sizes, transpose_rhs, dtype = CASES[case]
    rng = np.random.default_rng(3)
    g = len(sizes)
    lhs = rand(rng, (m, k), dtype)
    rhs = rand(rng, (g, n, k) if transpose_rhs else (g, k, n), dtype)
    proj = rand(rng, (m, n))
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def kernel(lhs, rhs, gs):
        return grouped_matmul(
            lhs, rhs, gs, transpose_rhs=transpose_rhs, backend=backend, interpret=True
        )

    def reference(lhs, rhs, gs):
        return gmm_reference(lhs, rhs, gs, transpose_rhs=transpose_rhs)

    got = _value_and_grads(kernel, lhs, rhs, group_sizes, proj)
    want = _value_and_grads(reference, lhs, rhs, group_sizes, proj)
    _check(got, want, dtype, sum(sizes))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_batch(backend):
    """A leading batch of lhs / rhs / group_sizes (the batched pallas_call, scalar prefetch too)."""
    rng = np.random.default_rng(5)
    m, k, n = 40, 16, 24
    sizes = [[12, 0, 21], [0, 30, 3]]  # both leave padding rows (33 of 40 used)
    lhs, rhs, proj = rand(rng, (2, m, k)), rand(rng, (2, 3, k, n)), rand(rng, (2, m, n))
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def kernel(lhs, rhs, gs):
        return jax.vmap(lambda *a: grouped_matmul(*a, backend=backend, interpret=True))(
            lhs, rhs, gs
        )

    got = _value_and_grads(kernel, lhs, rhs, group_sizes, proj)
    want = _value_and_grads(jax.vmap(gmm_reference), lhs, rhs, group_sizes, proj)
    _check(got, want, jnp.float32, 33)


def _visits(sizes: list[int], m: int, tm: int, tgmm: bool):
    off, gid, tid, flags = pallas_tpu._metadata(
        jnp.asarray(sizes, jnp.int32), m, tm, -(-m // tm), tgmm=tgmm
    )
    return np.asarray(off), np.asarray(gid), np.asarray(tid), np.asarray(flags)


@pytest.mark.parametrize("sizes", [[3, 0, 5, 0, 1, 7], [0, 0, 0], [16, 16], [0, 40, 0], [1] * 9])
def test_tpu_metadata_visits_every_group_tile_pair_once(sizes):
    """Worst cases for the static visit count (m tiles + groups - 1): many groups in one tile."""
    m, tm = 40, 8
    tiles = -(-m // tm)
    off, gid, tid, flags = _visits(sizes, m, tm, tgmm=False)
    pairs = {
        (i, t)
        for i in range(len(sizes))
        for t in range(tiles)
        if max(off[i], t * tm) < min(off[i + 1], (t + 1) * tm)
    }
    real = [(g, t) for g, t in zip(gid, tid) if g < len(sizes)]
    assert sorted(real) == sorted(pairs) and len(set(real)) == len(real)
    assert list(tid) == sorted(tid) and set(tid) == set(range(tiles))  # revisits are consecutive
    assert ((flags & pallas_tpu.FIRST) != 0).sum() == tiles  # each tile zeroed exactly once
    valid = (flags & pallas_tpu.VALID) != 0
    assert (
        valid.sum() == len(real) + tiles - len({t for _, t in real}) and valid[: valid.sum()].all()
    )

    off, gid, tid, flags = _visits(sizes, m, tm, tgmm=True)
    valid = (flags & pallas_tpu.VALID) != 0
    assert set(gid[valid]) == set(range(len(sizes)))  # empty groups too: their zeros are written
    assert set(zip(gid[valid], tid[valid])) >= pairs
    assert ((flags & pallas_tpu.LAST) != 0).sum() == len(sizes)
