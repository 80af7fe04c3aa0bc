"""Attention sinks (GPT-OSS) through llm-core: every attention backend and every cache agree with
the dot-product reference, values and gradients (sinks included). HF parity is in llm-convert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testutil import decode_all, paged_cache
from flax import nnx

from llm_core import build_model, load_config

TINY = dict(
    vocab_size=97, emb_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=96, seq_len=32, max_position_embeddings=64, attention_sinks=True,
    attention_bias=True, attention_pattern=["local", "global"], sliding_window=6,
)  # fmt: skip


def _model(**over):
    model = build_model(load_config(None, {**TINY, **over}), rngs=nnx.Rngs(0))
    for layer in (model.groups.layer_0, model.groups.layer_1):  # sinks big enough to matter
        layer.attn.sinks[...] = jnp.linspace(-1.0, 2.0, 4)
    return model


def _loss_and_grads(model, ids):
    graphdef, params = nnx.split(model)

    def loss(p):
        return jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, p)(ids), -1))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("backend", ["chunked", "flash"])
def test_backends_with_sinks_agree_with_dot_product(backend):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 32)), jnp.int32)
    ref_loss, ref_grads = _loss_and_grads(_model(), ids)
    loss, grads = _loss_and_grads(_model(attention_backend=backend, attention_chunk_size=8), ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    for path, g in flat:
        np.testing.assert_allclose(g[...], ref_flat[path][...], atol=2e-5, rtol=1e-3, err_msg=path)
    sink_grad = ref_flat[("groups", "layer_1", "attn", "sinks")][...]
    assert np.abs(sink_grad).max() > 1e-4  # the sinks really are in the loss


def test_sinks_change_the_output():
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (1, 16)), jnp.int32)
    with_sinks = _model()
    without = _model()
    for layer in (without.groups.layer_0, without.groups.layer_1):
        layer.attn.sinks[...] = jnp.full((4,), -1e9)
    assert np.abs(np.asarray(with_sinks(ids)) - np.asarray(without(ids))).max() > 1e-3


@pytest.mark.parametrize("kind", ["contiguous", "paged", "int8"])
def test_cache_decode_with_sinks_equals_full_forward(kind):
    model = _model(kv_cache_dtype="int8") if kind == "int8" else _model()
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 14)), jnp.int32)
    full = np.asarray(model(ids))
    cache = paged_cache(model, [[3, 1], [2, 4]]) if kind == "paged" else model.init_cache(2, 16)
    got = decode_all(model, ids, cache, prompt=9)
    tol = 5e-2 if kind == "int8" else 2e-5
    np.testing.assert_allclose(got, full, atol=tol, rtol=0)
