"""The C++ decode attention (paged pools and contiguous caches; float32, bfloat16 and scaled int8)
against a per-row numpy softmax and the jnp reference, forward and gradients: GQA groups of 1, 2 and 4, head dims that do and do not fill
a SIMD vector, lengths of 0, 1, a partial page, a full table and past it, sliding windows, soft-cap
and sinks; bad operands are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import max_err, rand

import llm_kernels
from llm_kernels import decode_attention, paged_attention, paged_attention_reference

pytestmark = [
    pytest.mark.cpu,
    pytest.mark.skipif(not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"),
]


def numpy_decode(q, keys, values, length, scale, window=None, softcap=None, sinks=None):
    """One row: q [H, D] over keys/values [K, T, D] (every position), the first `length` visible."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    heads, kv_heads = q.shape[0], keys.shape[0]
    out = np.zeros_like(q)
    lo = max(0, length - window) if window else 0  # the query sits at length - 1
    length = min(length, keys.shape[1])
    for h in range(heads):
        kh = h // (heads // kv_heads)
        s = keys[kh, lo:length] @ q[h] * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        logits = np.concatenate([s, [float(sinks[h])]]) if sinks is not None else s
        if logits.size == 0:
            continue
        p = np.exp(logits - logits.max())
        p = p[: s.size] / p.sum()
        out[h] = p @ values[kh, lo:length]
    return out


def paged_case(rng, batch, heads, kv_heads, dim, page, per_row, lengths):
    pool = batch * per_row + 1
    q = rand(rng, (batch, heads, dim))
    k, v = rand(rng, (kv_heads, pool, page, dim)), rand(rng, (kv_heads, pool, page, dim))
    table = jnp.asarray(rng.permutation(pool)[: batch * per_row].reshape(batch, per_row), jnp.int32)
    return q, k, v, jnp.asarray(lengths, jnp.int32), table


def row_keys(pool, table_row):
    return np.concatenate([np.asarray(pool[:, p]) for p in np.asarray(table_row)], axis=1)


OPTIONS = [
    {},
    {"sliding_window": 5, "logit_soft_cap": 3.0},
    {"sinks": True},
    {"sliding_window": 70, "sinks": True},
]
IDS = ["plain", "window-softcap", "sinks", "window-sinks"]


def options(kw, heads, rng):
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = jnp.asarray(rng.normal(size=heads) + 1.0, jnp.float32)
    return kw


def numpy_kw(kw):
    return {
        "window": kw.get("sliding_window"),
        "softcap": kw.get("logit_soft_cap"),
        "sinks": kw.get("sinks"),
    }


@pytest.mark.parametrize("kw", OPTIONS, ids=IDS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "page"), [(4, 4, 16, 8), (8, 4, 20, 16), (8, 2, 64, 16)]
)
def test_paged_kernel_matches_numpy_and_reference(kw, heads, kv_heads, dim, page):
    rng = np.random.default_rng(heads + dim)
    per_row = 6
    lengths = [0, 1, page + 3, per_row * page, per_row * page + 9]  # last: clipped to the table
    q, k, v, lengths, table = paged_case(rng, 5, heads, kv_heads, dim, page, per_row, lengths)
    kw = options(kw, heads, rng)
    got = jax.jit(lambda *a: paged_attention(*a, backend="cpu", **kw))(q, k, v, lengths, table)
    for b in range(q.shape[0]):
        want = numpy_decode(q[b], row_keys(k, table[b]), row_keys(v, table[b]), int(lengths[b]),
                            dim**-0.5, **numpy_kw(kw))  # fmt: skip
        np.testing.assert_allclose(np.asarray(got[b]), want, rtol=2e-5, atol=2e-5)
    ref = paged_attention_reference(q, k, v, lengths, table, **kw)
    assert max_err(got, ref) < 2e-5


@pytest.mark.parametrize("kw", OPTIONS, ids=IDS)
def test_contiguous_kernel_matches_numpy(kw):
    rng = np.random.default_rng(7)
    batch, heads, kv_heads, dim, length = 4, 6, 2, 24, 150  # 150: blocks of 64 plus a tail
    q = rand(rng, (batch, heads, dim))
    k, v = rand(rng, (batch, kv_heads, length, dim)), rand(rng, (batch, kv_heads, length, dim))
    lengths = jnp.asarray([0, 1, 77, 400], jnp.int32)
    kw = options(kw, heads, rng)
    got = jax.jit(lambda *a: decode_attention(*a, backend="cpu", **kw))(q, k, v, lengths)
    for b in range(batch):
        want = numpy_decode(q[b], k[b], v[b], int(lengths[b]), dim**-0.5, **numpy_kw(kw))
        np.testing.assert_allclose(np.asarray(got[b]), want, rtol=2e-5, atol=2e-5)
    ref = decode_attention(q, k, v, lengths, backend="reference", **kw)
    assert max_err(got, ref) < 2e-5
    assert max_err(decode_attention(q, k, v, lengths, **kw), got) == 0.0  # CPU default: kernel


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_bfloat16_cache_matches_its_widened_float32_copy(layout):
    """A bfloat16 cache is widened exactly in the kernel: the same as the float32 kernel on the
    widened cache (and a bfloat16 q gives that result rounded to bfloat16)."""
    rng = np.random.default_rng(5)
    q, k, v, lengths, table = paged_case(rng, 4, 8, 2, 40, 16, 4, [0, 5, 37, 64])
    if layout == "contiguous":
        k, v = (jnp.asarray(rng.normal(size=(4, 2, 64, 40)), jnp.float32) for _ in range(2))

    def run(q, k, v, backend="cpu"):
        if layout == "paged":
            return paged_attention(q, k, v, lengths, table, sliding_window=30, backend=backend)
        return decode_attention(q, k, v, lengths, sliding_window=30, backend=backend)

    k16, v16 = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    want = run(q, k16.astype(jnp.float32), v16.astype(jnp.float32))
    got = jax.jit(run)(q, k16, v16)
    assert got.dtype == jnp.float32
    assert max_err(got, want) < 1e-5
    assert max_err(run(q, k16, v16, "reference").astype(jnp.float32), want) < 2e-2
    got16 = jax.jit(run)(q.astype(jnp.bfloat16), k16, v16)
    assert got16.dtype == jnp.bfloat16
    assert max_err(got16.astype(jnp.float32), want) < 2e-2


def quantized(x):
    """Symmetric int8 per token and head, as llm-core's int8 caches store it."""
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0, 1e-8)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_int8_cache_matches_its_dequantized_float32_copy(layout):
    """An int8 cache with per-token scales is read in place: the same as the float32 kernel on the
    dequantized cache, and the reference backend dequantizes first."""
    rng = np.random.default_rng(6)
    q, k, v, lengths, table = paged_case(rng, 4, 8, 2, 40, 16, 4, [0, 5, 37, 64])
    if layout == "contiguous":
        k, v = (jnp.asarray(rng.normal(size=(4, 2, 64, 40)), jnp.float32) for _ in range(2))
    (kq, ks), (vq, vs) = quantized(k), quantized(v)
    sinks = jnp.asarray(rng.normal(size=8), jnp.float32)

    def run(q, k, v, backend="cpu", **scales):
        kw = {"sliding_window": 30, "logit_soft_cap": 5.0, "sinks": sinks, "backend": backend}
        if layout == "paged":
            return paged_attention(q, k, v, lengths, table, **kw, **scales)
        return decode_attention(q, k, v, lengths, **kw, **scales)

    want = run(q, kq.astype(jnp.float32) * ks, vq.astype(jnp.float32) * vs)
    got = jax.jit(lambda q, *a: run(q, *a[:2], k_scale=a[2], v_scale=a[3]))(q, kq, vq, ks, vs)
    assert got.dtype == jnp.float32
    assert max_err(got, want) < 1e-5
    ref = run(q, kq, vq, "reference", k_scale=ks, v_scale=vs)
    assert max_err(ref, want) < 1e-5
    jaxpr = str(jax.make_jaxpr(lambda q: run(q, kq, vq, None, k_scale=ks, v_scale=vs))(q))
    assert "llm_kernels_paged_decode_attention_int8" in jaxpr  # the CPU default reads int8
    with pytest.raises(ValueError, match="int8 cache needs"):
        run(q, kq, vq, k_scale=ks)
    with pytest.raises(ValueError, match="for int8 caches"):
        run(q, k, v, k_scale=ks, v_scale=vs)


def test_gradients_match_the_reference():
    rng = np.random.default_rng(3)
    q, k, v, lengths, table = paged_case(rng, 3, 4, 2, 16, 8, 3, [2, 11, 24])
    sinks = jnp.asarray(rng.normal(size=4), jnp.float32)
    proj = jnp.cos(jnp.arange(16, dtype=jnp.float32))

    def grads(backend):
        def loss(q, k, v, sinks):
            out = paged_attention(q, k, v, lengths, table, sinks=sinks, sliding_window=9,
                                  backend=backend)  # fmt: skip
            return jnp.sum(out * proj)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    for got, want in zip(grads("cpu"), grads("reference"), strict=True):
        assert max_err(got, want) < 1e-5


def test_page_ids_outside_the_pool_are_clamped_not_read_out_of_bounds():
    rng = np.random.default_rng(8)
    q, k, v, lengths, table = paged_case(rng, 2, 4, 2, 16, 8, 2, [16, 16])
    wild = table.at[0, 1].set(10**6).at[1, 0].set(-5)
    clamped = jnp.clip(wild, 0, k.shape[1] - 1)
    got = paged_attention(q, k, v, lengths, wild, backend="cpu")
    want = paged_attention(q, k, v, lengths, clamped, backend="cpu")
    assert max_err(got, want) == 0.0
    assert max_err(want, paged_attention_reference(q, k, v, lengths, clamped)) < 2e-5


def test_bad_operands_are_refused():
    rng = np.random.default_rng(4)
    q, k, v, lengths, table = paged_case(rng, 2, 4, 2, 16, 8, 2, [3, 4])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        paged_attention(q.astype(jnp.float16), k, v, lengths, table, backend="cpu")
    with pytest.raises(ValueError, match="k and v alike"):
        paged_attention(q, k, v.astype(jnp.bfloat16), lengths, table, backend="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        paged_attention(q, k, v, lengths, table, backend="gpu")
    with pytest.raises(ValueError, match="sinks must be"):
        paged_attention(q, k, v, lengths, table, sinks=jnp.zeros(3), backend="cpu")
    cache = rand(rng, (3, 2, 8, 16))
    with pytest.raises(ValueError, match="k batch 3 != q batch 2"):
        decode_attention(q, cache, cache, lengths)
    with pytest.raises(ValueError, match=r"k\.shape=\(2, 8, 16\)"):
        decode_attention(q, cache[0], cache[0], lengths)
