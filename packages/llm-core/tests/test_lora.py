"""LoRA adapters on Linear modules: identity at start, the merged model equals the adapted one,
path targeting, errors, and merged saving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import (
    ConfigError,
    Linear,
    LoRALinear,
    build_model,
    load,
    load_config,
    merged_params,
    save,
)
from llm_core.io import model_from_params
from llm_core.layers.lora import LoRAGroupedLinear, lora_dropout_key

TINY = [
    "num_layers=3",
    "emb_dim=32",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=8",
    "mlp_dim=48",
    "vocab_size=64",
]
IDS = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


def _pair(*extra):
    """(base model, the same weights with LoRA adapters) from one seed."""
    base = build_model(load_config(None, [*TINY, *extra]), rngs=nnx.Rngs(0))
    lora = build_model(load_config(None, [*TINY, *extra, "lora_rank=4"]), rngs=nnx.Rngs(0))
    return base, lora


def _randomise_b(model, seed=1):
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear | LoRAGroupedLinear):
            key, sub = jax.random.split(key)
            node.lora_b[...] = 0.05 * jax.random.normal(sub, node.lora_b.shape)


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapters_leave_the_model_unchanged(scan):
    base, lora = _pair(f"scan_layers={str(scan).lower()}")
    np.testing.assert_array_equal(np.asarray(lora(IDS)), np.asarray(base(IDS)))


@pytest.mark.parametrize("scan", [True, False])
def test_merged_weights_compute_the_adapted_model(scan):
    _, lora = _pair(f"scan_layers={str(scan).lower()}")
    _randomise_b(lora)
    adapted = np.asarray(lora(IDS))
    plain = model_from_params(lora.cfg.replace(lora_rank=0), merged_params(lora))
    merged = np.asarray(plain(IDS))
    assert np.abs(adapted - np.asarray(_pair()[0](IDS))).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=1e-5)


def test_adapter_forward_is_x_a_b_scaled():
    _, lora = _pair()
    _randomise_b(lora)
    q = lora.groups.layer_0.attn.q  # stacked over the 3 layers: check layer 0 by hand
    assert isinstance(q, LoRALinear) and q.scale == 16.0 / 4
    x = jax.random.normal(jax.random.key(3), (5, 32))
    a, b, k = q.lora_a[...][0], q.lora_b[...][0], q.base.kernel[...][0]
    want = jnp.einsum("ni,ihd->nhd", x, k) + q.scale * jnp.einsum(
        "nr,rhd->nhd", x @ a.reshape(32, 4), b
    )
    one = jax.tree.map(lambda v: v[0], nnx.state(q))
    got = nnx.merge(nnx.graphdef(q), one)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_targets_pick_modules_by_path():
    lora = build_model(
        load_config(None, [*TINY, "lora_rank=2", "lora_targets=attn/(q|v)$"]), rngs=nnx.Rngs(0)
    )
    wrapped = sorted(
        "/".join(map(str, p)) for p, n in nnx.iter_graph(lora) if isinstance(n, LoRALinear)
    )
    assert wrapped == ["groups/layer_0/attn/q", "groups/layer_0/attn/v"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["lora_targets=nothing_here$"], "lora_targets='nothing_here\\$' matches no Linear"),
        (["lora_targets=attn/(q"], "lora_targets='attn/\\(q' is not a valid regex"),
        (["lora_dropout=1.0"], "lora_dropout must be in"),
        (["lora_experts=true", "lora_rank=0"], "lora_experts=true .* lora_rank > 0"),
        (["lora_rank=-1"], "lora_rank must be >= 0"),
    ],
)
def test_bad_lora_settings_name_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        build_model(load_config(None, [*TINY, "lora_rank=2", *extra]), rngs=nnx.Rngs(0))


def test_save_writes_the_merged_plain_model(tmp_path):
    _, lora = _pair()
    _randomise_b(lora)
    path = save(lora, tmp_path / "merged")
    back = load(path)
    assert back.cfg.lora_rank == 0
    np.testing.assert_allclose(np.asarray(back(IDS)), np.asarray(lora(IDS)), atol=2e-5)


MOE = ["ffn_kind=moe", "num_experts=4", "num_experts_per_tok=2", "moe_mlp_dim=16"]


def test_lora_on_an_moe_model_warns_that_experts_stay_frozen():
    with pytest.warns(UserWarning, match="MoE expert weights .* stay frozen: set lora_experts"):
        build_model(load_config(None, [*TINY, *MOE, "lora_rank=2"]), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("matmul", ["ragged_dot", "tiled"])
def test_expert_adapters_start_as_identity_and_merge_into_the_expert_kernels(matmul):
    base = build_model(load_config(None, [*TINY, *MOE, f"moe_matmul={matmul}"]), rngs=nnx.Rngs(0))
    cfg = load_config(
        None, [*TINY, *MOE, f"moe_matmul={matmul}", "lora_rank=4", "lora_experts=true"]
    )
    lora = build_model(cfg, rngs=nnx.Rngs(0))
    gate = lora.groups.layer_0.mlp.gate
    assert isinstance(gate, LoRAGroupedLinear)
    assert gate.lora_a.shape == (3, 4, 32, 4) and gate.lora_b.shape == (3, 4, 4, 16)
    np.testing.assert_array_equal(np.asarray(lora(IDS)), np.asarray(base(IDS)))
    _randomise_b(lora)
    adapted = np.asarray(lora(IDS))
    assert np.abs(adapted - np.asarray(base(IDS))).max() > 1e-3  # the expert adapters matter
    plain = model_from_params(
        lora.cfg.replace(lora_rank=0, lora_experts=False), merged_params(lora)
    )
    np.testing.assert_allclose(np.asarray(plain(IDS)), adapted, atol=2e-5, rtol=1e-5)
    # by hand: expert e's gate kernel of layer 1 is W_e + (alpha / r) A_e B_e
    a, b = np.asarray(gate.lora_a[1]), np.asarray(gate.lora_b[1])
    want = np.asarray(gate.base.kernel[1]) + (16.0 / 4) * np.einsum("eir,ero->eio", a, b)
    got = np.asarray(merged_params(lora)["groups"]["layer_0"]["mlp"]["gate"]["kernel"][1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _dropout_layer(p: float):
    lora = build_model(
        load_config(None, [*TINY, "lora_rank=4", f"lora_dropout={p}"]), rngs=nnx.Rngs(0)
    )
    _randomise_b(lora)
    return lora


def test_dropout_acts_only_under_a_key_and_is_unbiased():
    lora = _dropout_layer(0.5)
    plain = np.asarray(lora(IDS))
    np.testing.assert_array_equal(np.asarray(_pair()[1].cfg.lora_dropout), 0.0)
    with lora_dropout_key(jax.random.key(0)):
        a = np.asarray(lora(IDS))
    with lora_dropout_key(jax.random.key(0)):
        again = np.asarray(lora(IDS))
    with lora_dropout_key(jax.random.key(1)):
        b = np.asarray(lora(IDS))
    np.testing.assert_array_equal(a, again)  # the key decides the masks
    assert np.abs(a - plain).max() > 1e-4 and np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(lora(IDS)), plain)  # outside the block: no dropout

    # one adapter: the mean over masks of dropout(x) A B is x A B (inverted dropout scaling)
    rngs = nnx.Rngs(0)
    base = Linear(32, 16, (None, None), weight_dtype=jnp.float32, rngs=rngs)
    layer = LoRALinear(base, 4, 16.0, rngs, dropout=0.5, index=3)
    layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(4), layer.lora_b.shape)
    x = jax.random.normal(jax.random.key(2), (4, 32))

    def dropped(key):
        with lora_dropout_key(key):
            return layer(x)

    keys = jax.random.split(jax.random.key(3), 4000)
    mean = jax.vmap(dropped)(keys).mean(0)
    clean = layer(x)
    spread = float(jnp.abs(jax.vmap(dropped)(keys[:8]) - clean).max())
    assert spread > 1e-3
    np.testing.assert_allclose(np.asarray(mean), np.asarray(clean), atol=0.05 * spread)


def test_every_adapter_and_stacked_layer_has_its_own_dropout_salt():
    lora = _dropout_layer(0.1)
    salts = [
        np.asarray(n.salt[...]).ravel()
        for _, n in nnx.iter_graph(lora)
        if isinstance(n, LoRALinear)
    ]
    flat = np.concatenate(salts)
    assert len(salts) == 7 and flat.size == 7 * 3 and len(set(flat.tolist())) == flat.size


def test_adapters_are_float32_on_a_bf16_base():
    lora = build_model(
        load_config(None, [*TINY, "lora_rank=2", "weight_dtype=bfloat16"]), rngs=nnx.Rngs(0)
    )
    q = lora.groups.layer_0.attn.q
    assert q.base.kernel.dtype == jnp.bfloat16 and q.lora_b.dtype == jnp.float32


@pytest.mark.parametrize("scan", [True, False])
def test_qlora_int8_base_is_close_and_merges_exactly(scan):
    extra = [f"scan_layers={str(scan).lower()}", "lora_rank=4"]
    float_base = build_model(load_config(None, [*TINY, *extra]), rngs=nnx.Rngs(0))
    qlora = build_model(
        load_config(None, [*TINY, *extra, "lora_base_quantization=int8"]), rngs=nnx.Rngs(0)
    )
    q = qlora.groups.layer_0.attn.q  # stacked parameters in both modes (scan or loop)
    assert q.base.kernel_q.dtype == jnp.int8 and q.base.scale.dtype == jnp.float32
    ref, got = np.asarray(float_base(IDS)), np.asarray(qlora(IDS))
    # int8 with per-channel scales: within 2% of the logit range of the float model
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    _randomise_b(qlora)
    plain = model_from_params(
        qlora.cfg.replace(lora_rank=0, lora_base_quantization="none"), merged_params(qlora)
    )
    np.testing.assert_allclose(np.asarray(plain(IDS)), np.asarray(qlora(IDS)), atol=2e-5)


def test_qlora_needs_lora():
    with pytest.raises(ConfigError, match=r"lora_base_quantization=int8 .* set lora_rank > 0"):
        load_config(None, [*TINY, "lora_base_quantization=int8"])
