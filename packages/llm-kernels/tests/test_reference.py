"""The jnp reference itself, against a direct NumPy loop over (query, key) pairs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import packed_segments, qkv

from llm_kernels import mha_reference

pytestmark = pytest.mark.cpu


def numpy_attention(q, k, v, causal, window, seg, cap):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            hk = h // (heads // kv_heads)
            for i in range(q_len):
                pos = kv_len - q_len + i
                keys = [
                    j
                    for j in range(kv_len)
                    if (not causal or j <= pos)
                    and (window is None or pos - j < window)
                    and (seg is None or seg[b, i] == seg[b, j])
                ]
                if not keys:
                    continue
                s = np.array([q[b, i, h] @ k[b, j, hk] / math.sqrt(dim) for j in keys])
                if cap is not None:
                    s = cap * np.tanh(s / cap)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, i, h] = p @ v[b, keys, hk]
    return out


@pytest.mark.parametrize(
    "q_len,kv_len,heads,kv_heads,kw",
    [
        (9, 9, 4, 2, dict(causal=True)),
        (5, 11, 2, 1, dict(causal=True, sliding_window=4)),
        (12, 12, 2, 2, dict(causal=False, logit_soft_cap=0.5, segments=[5, 4])),
        (11, 5, 2, 2, dict(causal=True)),  # first queries see no key: zeros
    ],
)
def test_reference_matches_numpy_loop(q_len, kv_len, heads, kv_heads, kw):
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 2, q_len, kv_len, heads, kv_heads, 8)
    seg = packed_segments(2, q_len, kw.pop("segments")) if "segments" in kw else None
    out = mha_reference(q, k, v, segment_ids=seg, **kw)
    expect = numpy_attention(
        q, k, v, kw.get("causal", True), kw.get("sliding_window"),
        None if seg is None else np.asarray(seg), kw.get("logit_soft_cap"),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), expect, atol=1e-5, rtol=0)


def test_reference_empty_rows_have_finite_gradients():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 8, 4, 2, 2, 8)
    out = mha_reference(q, k, v, causal=True)
    assert float(jnp.max(jnp.abs(out[:, :4]))) == 0.0
    grads = jax.grad(lambda *a: jnp.sum(mha_reference(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
