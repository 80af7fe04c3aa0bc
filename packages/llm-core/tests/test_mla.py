"""Multi-head latent attention: the absorbed latent-cache path equals the expanded forward
(contiguous and paged), every backend agrees, the cache holds only the latent rows, bad configs name
their keys. HF parity of the DeepSeek families is in llm-convert's tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testutil import decode_all, paged_cache
from flax import nnx

from llm_core import ConfigError, build_model, load_config

MLA = dict(
    vocab_size=97, emb_dim=64, num_layers=3, num_heads=4, mlp_dim=96, seq_len=32,
    max_position_embeddings=64, attention_kind="mla", kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, ffn_kind="moe", num_experts=8,
    num_experts_per_tok=2, moe_mlp_dim=16, first_num_dense_layers=1, router_kind="sigmoid_topk",
    moe_num_groups=4, moe_topk_groups=2, num_shared_experts=1, routed_scaling_factor=2.5,
)  # fmt: skip


def _model(**over):
    return build_model(load_config(None, {**MLA, **over}), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_latent_cache_decode_equals_full_forward(q_lora_rank):
    model = _model(q_lora_rank=q_lora_rank)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 14)), jnp.int32)
    full = np.asarray(model(ids))
    contiguous = decode_all(model, ids, model.init_cache(2, 16), prompt=9)
    np.testing.assert_allclose(contiguous, full, atol=2e-5, rtol=0)
    paged = paged_cache(model, [[3, 1], [2, 4]])
    np.testing.assert_allclose(decode_all(model, ids, paged, 9), contiguous, atol=2e-6, rtol=0)


def test_latent_cache_holds_only_latent_rows():
    """kv_lora_rank + qk_rope_head_dim values per token and layer, whatever the head count."""
    model = _model(num_heads=8)
    cache = model.init_cache(1, 16)
    leaves = jax.tree.leaves(cache)
    per_token = sum(a.size for a in leaves) / 16
    assert per_token == MLA["num_layers"] * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"])


@pytest.mark.parametrize("backend", ["chunked", "flash"])
def test_backends_agree_with_dot_product(backend):
    """Values and gradients; flash pads V (width 12) to the query/key width (24)."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 32)), jnp.int32)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model)

        def loss(p):
            return jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, p)(ids), -1))

        return jax.value_and_grad(loss)(params)

    ref_loss, ref_grads = loss_and_grads(_model())
    loss, grads = loss_and_grads(_model(attention_backend=backend, attention_chunk_size=8))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3)


def test_scan_equals_loop_and_decode_view():
    from llm_core import unstack_layers

    ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, (1, 10)), jnp.int32)
    scanned = _model()
    looped = _model(scan_layers=False)
    np.testing.assert_allclose(np.asarray(looped(ids)), np.asarray(scanned(ids)), atol=1e-6)
    view = unstack_layers(scanned)
    np.testing.assert_allclose(
        decode_all(view, ids, view.init_cache(1, 16), 6), np.asarray(scanned(ids)), atol=2e-5
    )


@pytest.mark.parametrize(
    ("over", "words"),
    [
        (dict(kv_lora_rank=0, v_head_dim=0), ["kv_lora_rank", "v_head_dim"]),
        (dict(qk_rope_head_dim=7), ["qk_rope_head_dim", "even"]),
        (dict(moe_topk_groups=5), ["moe_topk_groups", "moe_num_groups"]),
        (dict(moe_num_groups=3), ["num_experts", "moe_num_groups"]),
        (dict(moe_num_groups=8, moe_topk_groups=1), ["moe_num_groups", "two"]),
        (
            dict(router_kind="softmax_topk", router_bias_update_rate=0.01),
            ["router_bias_update_rate"],
        ),
        (dict(kv_cache_dtype="int8"), ["kv_cache_dtype", "mla"]),
    ],
)
def test_bad_mla_and_routing_configs_name_the_key(over, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, {**MLA, **over})
    for word in words:
        assert word in str(err.value)
