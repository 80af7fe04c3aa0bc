"""The decode-step attention over a head-major cache (XLA, and llm-kernels' C++ kernel where it
applies) equals the reference backend over the same keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm_kernels
from llm_core.layers import attention_ops as ops
from llm_core.layers.kv_cache import ContiguousKV, Int8ContiguousKV, Int8PagedKV

SPECS = {
    "causal": {},
    "window": {"sliding_window": 5},
    "softcap": {"logit_softcap": 3.0},
    "chunk": {"chunk": 8},
}


@pytest.mark.parametrize("use_kernel", [False, None], ids=["xla", "default"])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_decode_attention_matches_dot_product(name, sinks, use_kernel):
    b, h, kh, d, t = 3, 8, 2, 16, 24
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, 1, h, d))
    k = jax.random.normal(keys[1], (b, kh, t, d))  # head-major, as ContiguousKV stores it
    v = jax.random.normal(keys[2], (b, kh, t, d))
    sink = jax.random.normal(keys[3], (h,)) if sinks else None
    positions = jnp.array([[0], [11], [23]], jnp.int32)  # keys past a row's position: masked
    spec = ops.AttentionSpec(scale=d**-0.5, **SPECS[name])
    got = ops.decode_attention(q, k, v, positions, spec, sinks=sink, use_kernel=use_kernel)
    jaxpr = str(jax.make_jaxpr(
        lambda *a: ops.decode_attention(*a, spec, sinks=sink, use_kernel=use_kernel)
    )(q, k, v, positions))  # fmt: skip
    kernel = use_kernel is None and name != "chunk" and llm_kernels.cpu_kernels_available()
    assert ("llm_kernels_paged_decode_attention" in jaxpr) == kernel
    kv_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    want = ops.dot_product_attention(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), positions, kv_pos, spec, sinks=sink
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the keys a row cannot see change nothing
    later = jnp.arange(t)[None, None, :, None] > positions[:, :, None, None]
    noisy = ops.decode_attention(
        q, jnp.where(later, 1e3, k), v, positions, spec, sinks=sink, use_kernel=use_kernel
    )
    np.testing.assert_allclose(noisy, got, rtol=1e-5, atol=1e-6)


def test_bfloat16_prompt_over_a_contiguous_cache():
    """XLA:CPU failed at run time on this (a batched bf16 x bf16 -> f32 dot over the head-major
    cache: a bfloat16 model's batched prefill); it now runs and matches float32 to bf16 accuracy."""
    b, s, h, kh, d, length = 2, 8, 4, 2, 16, 16
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(key, (b, s, n, d)) for key, n in zip(keys, (h, kh, kh)))
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    spec = ops.AttentionSpec(scale=d**-0.5)

    def prompt(q, k, v):
        cache = ContiguousKV.create(b, length, kh, d, q.dtype).write(k, v, positions)
        return cache.attend(q, positions, spec)

    want = jax.jit(prompt)(q, k, v)
    bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got = jax.jit(prompt)(*bf16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


def test_int8_caches_are_read_in_place_by_the_kernel():
    """A decode step over an int8 cache (contiguous and paged) goes to the C++ kernel with the int8
    rows and scales, and equals XLA's attention over the dequantized cache."""
    if not llm_kernels.cpu_kernels_available():
        pytest.skip("C++ kernels not built")
    b, h, kh, d, length, page = 3, 8, 2, 16, 32, 8
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    k, v = (jax.random.normal(key, (b, length, kh, d)) for key in keys[:2])
    q = jax.random.normal(keys[2], (b, 1, h, d))
    sink = jax.random.normal(keys[3], (h,))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    step = jnp.array([[3], [17], [31]], jnp.int32)
    spec = ops.AttentionSpec(scale=d**-0.5, sliding_window=12)
    contiguous = Int8ContiguousKV.create(b, length, kh, d).write(k, v, positions)
    table = jnp.arange(1, 1 + b * length // page, dtype=jnp.int32).reshape(b, -1)
    paged = Int8PagedKV.create(b, kh, d, 1 + b * length // page, page, length // page)
    paged = paged.with_table(table).write(k, v, positions)
    deq = [contiguous.k * contiguous.k_scale, contiguous.v * contiguous.v_scale]
    want = ops.decode_attention(q, *deq, step, spec, sinks=sink, use_kernel=False)
    for cache in (contiguous, paged):
        got = cache.attend(q, step, spec, sinks=sink)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        jaxpr = str(jax.make_jaxpr(lambda q, c: c.attend(q, step, spec, sinks=sink))(q, cache))
        assert "llm_kernels_paged_decode_attention_int8" in jaxpr
