"""attention_backend=flash (llm-kernels) gives the same logits and gradients as dot_product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import build_model, load_config

TINY = [
    "num_layers=2",
    "emb_dim=64",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=16",
    "mlp_dim=96",
    "vocab_size=97",
    "max_position_embeddings=64",
    "seq_len=32",
]


def _loss_and_grads(cfg, ids, segment_ids=None):
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p):
        logits = nnx.merge(graphdef, p)(
            ids, None if segment_ids is None else _positions(segment_ids), segment_ids
        )
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


def _positions(segment_ids):
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1]), jnp.diff(segment_ids, axis=1) != 0], 1
    )
    idx = jnp.arange(segment_ids.shape[1])
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(jnp.int32)


@pytest.mark.parametrize("name,extra", [("llama3.1-8b", []), ("gemma2-2b", ["sliding_window=5"])])
def test_flash_matches_dot_product_logits_and_grads(name, extra):
    ids = jax.random.randint(jax.random.key(0), (2, 19), 0, 97, dtype=jnp.int32)
    ref_logits, ref_grads = _loss_and_grads(load_config(name, [*TINY, *extra]), ids)
    logits, grads = _loss_and_grads(
        load_config(name, [*TINY, *extra, "attention_backend=flash"]), ids
    )
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads)
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_flash_with_packed_segments():
    ids = jax.random.randint(jax.random.key(1), (1, 16), 0, 97, dtype=jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
    ref, _ = _loss_and_grads(load_config("llama3.1-8b", TINY), ids, segments)
    out, _ = _loss_and_grads(
        load_config("llama3.1-8b", [*TINY, "attention_backend=flash"]), ids, segments
    )
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
