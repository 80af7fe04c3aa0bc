"""Llama 4 text layers: NoPE placement, chunked attention masks, temperature tuning and the
weightless QK norm; the cache paths (contiguous, paged) equal the full forward across chunk
boundaries. HF parity is in llm-convert's tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from decode_testutil import decode_all, paged_cache
from flax import nnx

from llm_core import ConfigError, build_model, layer_placement, load_config

TINY = dict(
    vocab_size=97, emb_dim=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=96, seq_len=32, max_position_embeddings=64, rope_interleave=True,
    nope_layer_interval=4, attention_local_chunk=6, qk_l2_norm=True, attn_temperature_tuning=True,
    attn_floor_scale=3.0, ffn_kind="moe", num_experts=4, num_experts_per_tok=1, moe_mlp_dim=24,
    moe_layer_interval=2, router_kind="topk_sigmoid_input", num_shared_experts=1,
)  # fmt: skip


def _model(**over):
    return build_model(load_config(None, {**TINY, **over}), rngs=nnx.Rngs(0))


def test_layer_kinds_and_placement():
    kinds = layer_placement(load_config(None, TINY)).segments[0].kinds
    assert [(k.rope, k.ffn) for k in kinds] == [
        (True, "dense"), (True, "moe"), (True, "dense"), (False, "moe"),
    ]  # fmt: skip


def test_chunked_attention_really_masks():
    """Changing a token in an earlier chunk changes the NoPE (full) layer's view but not a RoPE
    layer's: with every layer RoPE + chunked, logits after the chunk boundary ignore it."""
    model = _model(nope_layer_interval=0)
    ids = np.random.default_rng(0).integers(0, 97, (1, 12)).astype(np.int32)
    other = ids.copy()
    other[0, 1] = (other[0, 1] + 1) % 97
    a, b = np.asarray(model(jnp.asarray(ids))), np.asarray(model(jnp.asarray(other)))
    np.testing.assert_allclose(a[0, 6:], b[0, 6:], atol=1e-6)  # the second chunk never sees it
    assert np.abs(a[0, 1:6] - b[0, 1:6]).max() > 1e-4
    full = _model()  # layer 3 is NoPE and attends to everything
    assert np.abs(np.asarray(full(jnp.asarray(ids)))[0, 6:] - np.asarray(full(jnp.asarray(other)))[0, 6:]).max() > 1e-4  # fmt: skip


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_cache_decode_equals_full_forward_across_chunks(kind):
    model = _model()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 15)), jnp.int32)
    full = np.asarray(model(ids))
    cache = paged_cache(model, [[3, 1], [2, 4]]) if kind == "paged" else model.init_cache(2, 16)
    np.testing.assert_allclose(decode_all(model, ids, cache, prompt=4), full, atol=2e-5, rtol=0)


def test_bad_llama4_configs_name_the_key():
    with pytest.raises(ConfigError, match="attention_local_chunk"):
        load_config(None, {**TINY, "attention_local_chunk": 0})


def test_flash_backend_applies_the_chunk_mask():
    """The flash kernels (interpret mode on the CPU) give the dot-product logits for sequences
    longer than the chunk, packed ones included (chunks count from each sequence's start), and
    the gradients agree."""
    import jax

    ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 20)), jnp.int32)
    seg = jnp.asarray([[1] * 20, [1] * 9 + [2] * 11], jnp.int32)
    pos = jnp.asarray([list(range(20)), list(range(9)) + list(range(11))], jnp.int32)
    dense, flash = _model(), _model(attention_backend="flash")
    want = np.asarray(dense(ids, positions=pos, segment_ids=seg))
    got = np.asarray(flash(ids, positions=pos, segment_ids=seg))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)

    def loss(model):
        return jnp.mean(model(ids, positions=pos, segment_ids=seg) ** 2)

    g_dense = jax.tree.leaves(nnx.grad(loss)(dense))
    g_flash = jax.tree.leaves(nnx.grad(loss)(flash))
    for a, b in zip(g_dense, g_flash, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0)
