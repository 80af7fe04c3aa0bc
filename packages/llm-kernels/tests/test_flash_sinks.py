"""Attention sinks (GPT-OSS): one learned logit per head in every softmax row, attending to nothing.

The reference is checked against an independent form (the sink as an explicit extra score column,
as transformers' GPT-OSS writes it); every kernel backend (the C++ CPU kernel, and the Pallas TPU
and GPU kernels in interpret mode) against the reference, values and gradients of q, k, v and the
sinks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import max_err, packed_segments, qkv

import llm_kernels
from llm_kernels.flash_attention.reference import attention_mask

pytestmark = pytest.mark.cpu
OPTS = dict(causal=True, sliding_window=9, sm_scale=0.3)


def _column_form(q, k, v, sinks, segment_ids):
    """softmax over [scores, sink] with the sink column dropped afterwards (no stable tricks)."""
    b, lq, h, _ = q.shape
    g = h // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * OPTS["sm_scale"]
    mask = attention_mask(
        lq, k.shape[1], causal=True, sliding_window=OPTS["sliding_window"], segment_ids=segment_ids
    )[:, None]
    s = jnp.where(mask, s, -jnp.inf)
    column = jnp.broadcast_to(sinks[None, :, None, None], (b, h, lq, 1))
    p = jax.nn.softmax(jnp.concatenate([s, column], -1), axis=-1)[..., :-1]
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv)


def _loss_and_grads(fn, q, k, v, sinks):
    proj = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32) * 0.7)

    def loss(q, k, v, sinks):
        return jnp.sum(fn(q, k, v, sinks) * proj)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)


def _inputs(seed=3, q_len=37, heads=4, kv_heads=2):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 2, q_len, q_len, heads, kv_heads, 16)
    sinks = jnp.asarray(rng.normal(size=heads).astype(np.float32) + 1.0)
    return q, k, v, sinks, packed_segments(2, q_len, [11, 14])


def test_reference_sinks_equal_the_extra_column_form():
    q, k, v, sinks, seg = _inputs()
    ref = lambda q, k, v, s: llm_kernels.mha_reference(q, k, v, segment_ids=seg, sinks=s, **OPTS)  # noqa: E731
    col = lambda q, k, v, s: _column_form(q, k, v, s, seg)  # noqa: E731
    (l1, g1), (l2, g2) = _loss_and_grads(ref, q, k, v, sinks), _loss_and_grads(col, q, k, v, sinks)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert max_err(a, b) < 1e-5
    # and the sinks matter: without them the output differs
    plain = llm_kernels.mha_reference(q, k, v, segment_ids=seg, **OPTS)
    assert max_err(plain, ref(q, k, v, sinks)) > 1e-2


@pytest.mark.parametrize(
    ("backend", "interpret"), [("cpu", False), ("pallas_tpu", True), ("pallas_gpu", True)]
)
def test_kernels_with_sinks_match_the_reference(backend, interpret):
    if backend == "cpu" and not llm_kernels.cpu_kernels_available():
        pytest.skip("C++ CPU kernels not built")
    q, k, v, sinks, seg = _inputs()

    def kernel(q, k, v, s):
        return llm_kernels.flash_attention(
            q, k, v, segment_ids=seg, sinks=s, backend=backend, interpret=interpret,
            block_q=16, block_k=16, **OPTS,
        )  # fmt: skip

    def reference(q, k, v, s):
        return llm_kernels.mha_reference(q, k, v, segment_ids=seg, sinks=s, **OPTS)

    (l1, g1), (l2, g2) = (
        _loss_and_grads(kernel, q, k, v, sinks),
        _loss_and_grads(reference, q, k, v, sinks),
    )
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), g1, g2):
        assert max_err(a, b) < 5e-5, name


def test_bad_sinks_shape_names_the_argument():
    q, k, v, sinks, _ = _inputs()
    with pytest.raises(ValueError, match="sinks must be"):
        llm_kernels.flash_attention(q, k, v, sinks=sinks[:2])


def test_paged_decode_with_sinks_equals_reference():
    """One decode query per row over pages (shuffled) vs the contiguous reference."""
    rng = np.random.default_rng(5)
    b, heads, kv_heads, d, page, n = 2, 4, 2, 16, 8, 3
    lengths = jnp.array([19, 24], jnp.int32)
    q, k, v = qkv(rng, b, 1, page * n, heads, kv_heads, d)
    sinks = jnp.asarray(rng.normal(size=heads).astype(np.float32))
    table = jnp.array([[4, 1, 6], [2, 5, 3]], jnp.int32)
    pool_k = (
        jnp.zeros((kv_heads, 7, page, d))
        .at[:, table]
        .set(jnp.moveaxis(k.reshape(b, n, page, kv_heads, d), 3, 0))
    )
    pool_v = (
        jnp.zeros((kv_heads, 7, page, d))
        .at[:, table]
        .set(jnp.moveaxis(v.reshape(b, n, page, kv_heads, d), 3, 0))
    )
    got = llm_kernels.paged_attention(q[:, 0], pool_k, pool_v, lengths, table, sinks=sinks)
    kernel = llm_kernels.paged_attention(  # the Pallas kernel
        q[:, 0], pool_k, pool_v, lengths, table, sinks=sinks, interpret=True
    )
    plain = llm_kernels.paged_attention(q[:, 0], pool_k, pool_v, lengths, table, interpret=True)
    for row in range(b):
        length = int(lengths[row])
        want = llm_kernels.mha_reference(
            q[row : row + 1], k[row : row + 1, :length], v[row : row + 1, :length], sinks=sinks
        )
        assert max_err(got[row], want[0, 0]) < 1e-5
        assert max_err(kernel[row], want[0, 0]) < 1e-5
        assert max_err(plain[row], want[0, 0]) > 1e-3  # the sinks change the output
    empty = llm_kernels.paged_attention(  # no visible key: the sink takes all the weight
        q[:, 0], pool_k, pool_v, jnp.zeros_like(lengths), table, sinks=sinks, interpret=True
    )
    assert float(jnp.max(jnp.abs(empty))) == 0.0
