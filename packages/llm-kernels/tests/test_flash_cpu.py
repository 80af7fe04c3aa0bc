"""The C++ XLA FFI flash attention (backend="cpu") against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from kernels_testutil import attention_pair, grads, max_err, packed_segments, qkv, scaled_err

import llm_kernels

pytestmark = [
    pytest.mark.cpu,
    pytest.mark.skipif(not llm_kernels.cpu_kernels_available(), reason="C++ kernels not built"),
]

F32_OUT, F32_GRAD = 1e-5, 5e-5
BF16_OUT, BF16_GRAD = 2e-2, 2e-2  # scaled_err (relative to max |reference|)

CASES = {
    "causal-mha": (2, 37, 37, 4, 4, 16, dict(causal=True)),
    "full-gqa2": (2, 37, 37, 4, 2, 16, dict(causal=False)),
    "causal-gqa4-kvlonger": (1, 21, 50, 8, 2, 24, dict(causal=True)),
    "causal-mqa": (1, 33, 33, 8, 1, 16, dict(causal=True)),
    "window-gqa2": (2, 45, 45, 4, 2, 16, dict(causal=True, sliding_window=9)),
    "window-noncausal": (1, 30, 30, 2, 1, 8, dict(causal=False, sliding_window=5)),
    "softcap": (1, 40, 40, 4, 2, 16, dict(causal=True, logit_soft_cap=2.0)),
    "segments-gqa4": (2, 48, 48, 4, 1, 16, dict(causal=True, segments=[7, 20, 3])),
    "segments-window-softcap": (
        1,
        37,
        37,
        2,
        2,
        8,
        dict(causal=False, sliding_window=6, logit_soft_cap=1.5, segments=[10]),
    ),
    "qlonger-empty-rows": (1, 40, 23, 2, 1, 8, dict(causal=True)),
    "head-dim-80": (1, 20, 20, 2, 1, 80, dict(causal=True)),
}


def _setup(case, dtype, seed=0):
    batch, q_len, kv_len, heads, kv_heads, dim, kw = CASES[case]
    kw = dict(kw)
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, batch, q_len, kv_len, heads, kv_heads, dim, dtype)
    if "segments" in kw:
        kw["segment_ids"] = packed_segments(batch, q_len, kw.pop("segments"))
    return (q, k, v), kw


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block", [16, 64])
def test_cpu_forward_and_grads_f32(case, block):
    (q, k, v), kw = _setup(case, jnp.float32)
    kernel, reference = attention_pair("cpu", block_q=block, block_k=block, **kw)
    assert max_err(kernel(q, k, v), reference(q, k, v)) < F32_OUT
    for got, want in zip(grads(kernel, q, k, v), grads(reference, q, k, v)):
        assert got.dtype == want.dtype
        assert max_err(got, want) < F32_GRAD


@pytest.mark.parametrize("case", ["causal-mha", "window-gqa2", "segments-gqa4", "causal-mqa"])
def test_cpu_bf16(case):
    (q, k, v), kw = _setup(case, jnp.bfloat16)
    kernel, reference = attention_pair("cpu", **kw)
    out = kernel(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert scaled_err(out, reference(q, k, v)) < BF16_OUT
    for got, want in zip(grads(kernel, q, k, v), grads(reference, q, k, v)):
        assert got.dtype == jnp.bfloat16
        assert scaled_err(got, want) < BF16_GRAD


def test_cpu_empty_rows_are_zero_and_grads_finite():
    (q, k, v), kw = _setup("qlonger-empty-rows", jnp.float32)
    kernel, _ = attention_pair("cpu", **kw)
    out = kernel(q, k, v)
    assert float(jnp.max(jnp.abs(out[:, :17]))) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads(kernel, q, k, v))


@pytest.mark.parametrize("case", ["causal-mha", "window-gqa2", "softcap"])
def test_cpu_check_grads(case):
    _, _, _, heads, kv_heads, _, kw = CASES[case]
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 12, 12, heads, kv_heads, 8, jnp.float32)
    kw = {key: val for key, val in kw.items() if key != "segments"}
    kernel, _ = attention_pair("cpu", **kw)
    check_grads(kernel, (q, k, v), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def test_cpu_vmap_and_jit():
    (q, k, v), kw = _setup("segments-gqa4", jnp.float32)
    stacked = [jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v)]
    seg = kw.pop("segment_ids")

    def one(q, k, v, s):
        return llm_kernels.flash_attention(q, k, v, segment_ids=s, backend="cpu", **kw)

    segs = jnp.stack([seg, seg])
    got = jax.jit(jax.vmap(one))(*stacked, segs)
    want = jnp.stack([llm_kernels.mha_reference(*(x[i] for x in stacked), segment_ids=seg, **kw)
                      for i in range(2)])  # fmt: skip
    assert max_err(got, want) < F32_OUT
    g = jax.vmap(jax.grad(lambda q, k, v, s: jnp.sum(one(q, k, v, s) ** 2)))(*stacked, segs)
    g_ref = jax.grad(
        lambda q: jnp.sum(llm_kernels.mha_reference(q, stacked[1][0], stacked[2][0],
                                                    segment_ids=seg, **kw) ** 2)
    )(stacked[0][0])  # fmt: skip
    assert max_err(g[0], g_ref) < F32_GRAD


def test_cpu_is_default_on_cpu():
    (q, k, v), _ = _setup("causal-mha", jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: llm_kernels.flash_attention(q, k, v))(q, k, v))
    assert "llm_kernels_attention_fwd" in jaxpr


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cpu_other_isa_builds(isa):
    """The SSE (x86-64-v2) and AVX2 builds, picked with LLM_KERNELS_ISA in a fresh process."""
    import os
    import subprocess
    import sys

    script = (
        "import jax, jax.numpy as jnp, numpy as np, llm_kernels as lk\n"
        "info = lk.cpu_kernels_info()\n"
        "r = np.random.default_rng(0)\n"
        "q, k, v = (jnp.asarray(r.standard_normal((1, 45, 4, 24), dtype=np.float32)) for _ in range(3))\n"
        "kw = dict(sliding_window=9, logit_soft_cap=2.0)\n"
        "f = lambda fn: jax.value_and_grad(lambda q: jnp.sum(fn(q, k, v, **kw) ** 2))(q)\n"
        "(a, ga), (b, gb) = f(lambda *x, **y: lk.flash_attention(*x, backend='cpu', **y)), f(lk.mha_reference)\n"
        "print(info['isa'], float(jnp.abs(a - b) / b), float(jnp.max(jnp.abs(ga - gb))))\n"
    )
    env = dict(os.environ, LLM_KERNELS_ISA=isa)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got_isa, loss_err, grad_err = out.stdout.split()
    if got_isa != isa:
        pytest.skip(f"CPU lacks {isa}")
    assert float(loss_err) < 1e-5 and float(grad_err) < 5e-5
