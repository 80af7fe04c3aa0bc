"""The Pallas TPU (Mosaic) and GPU (Triton) kernels in interpret mode, against the reference.

Interpret mode is slow, so each case checks forward and all three gradients in one go, and the
cases are spread so that every feature (GQA 1/2/4/8, causal or not, sliding window, segments,
soft-cap, lengths that are not block multiples, q_len != kv_len, bf16) runs on both kernels.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from kernels_testutil import attention_pair, grads, max_err, packed_segments, qkv, scaled_err

pytestmark = pytest.mark.cpu

F32_OUT, F32_GRAD = 1e-5, 5e-5
BF16_OUT, BF16_GRAD = 2e-2, 2e-2  # scaled_err (relative to max |reference|)

# (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, options)
CASES = {
    "causal-gqa2-odd": (2, 37, 37, 4, 2, 16, jnp.float32, dict(causal=True)),
    "full-mha-softcap": (1, 37, 37, 2, 2, 8, jnp.float32, dict(causal=False, logit_soft_cap=2.0)),
    "window-gqa4-kvlonger": (1, 20, 45, 4, 1, 8, jnp.float32, dict(causal=True, sliding_window=7)),
    "segments-mqa": (1, 40, 40, 8, 1, 8, jnp.float32, dict(causal=True, segments=[9, 17])),
    "bf16-causal-gqa2": (1, 33, 33, 4, 2, 16, jnp.bfloat16, dict(causal=True)),
}


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_pallas_interpret_forward_and_grads(backend, case):
    batch, q_len, kv_len, heads, kv_heads, dim, dtype, kw = CASES[case]
    kw = dict(kw)
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, batch, q_len, kv_len, heads, kv_heads, dim, dtype)
    if "segments" in kw:
        kw["segment_ids"] = packed_segments(batch, q_len, kw.pop("segments"))
    kernel, reference = attention_pair(backend, interpret=True, block_q=16, block_k=16, **kw)
    f32 = dtype == jnp.float32
    err = max_err if f32 else scaled_err
    out_tol, grad_tol = (F32_OUT, F32_GRAD) if f32 else (BF16_OUT, BF16_GRAD)
    out = kernel(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert err(out, reference(q, k, v)) < out_tol
    for got, want in zip(grads(kernel, q, k, v), grads(reference, q, k, v)):
        assert got.dtype == dtype
        assert err(got, want) < grad_tol


def test_interpret_defaults_to_tpu_kernel():
    import jax

    import llm_kernels

    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 1, 16, 16, 2, 2, 8)
    jaxpr = str(jax.make_jaxpr(lambda *a: llm_kernels.flash_attention(*a, interpret=True))(q, k, v))
    assert "pallas_call" in jaxpr
