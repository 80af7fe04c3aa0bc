"""LoRA adapters on Linear modules: identity at start, the merged model equals the adapted one,
path targeting, errors, and merged saving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import ConfigError, LoRALinear, build_model, load, load_config, merged_params, save
from llm_core.io import model_from_params

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
        if isinstance(node, LoRALinear):
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
        (["lora_dropout=0.1"], "lora_dropout.* not implemented yet"),
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


def test_lora_on_an_moe_model_warns_that_experts_stay_frozen():
    moe = ["ffn_kind=moe", "num_experts=4", "num_experts_per_tok=2", "moe_mlp_dim=16"]
    with pytest.warns(UserWarning, match="MoE expert weights .* stay frozen"):
        build_model(load_config(None, [*TINY, *moe, "lora_rank=2"]), rngs=nnx.Rngs(0))


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
