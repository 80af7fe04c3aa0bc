"""Model skeleton: published parameter counts, scan = loop, backends agree, cache path = full path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import Linear, build_model, iter_linears, load_config, pack_linears, unstack_layers
from llm_core.layers.packed import PackedLinear
from llm_core.models.counting import count_params

# Published totals (embeddings counted once when tied).
EXACT = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-70b": 70_553_706_496,
    "llama3.3-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-1b": 999_885_952,
    "mixtral-8x7b": 46_702_792_704,
    "deepseek-v3": 671_026_419_200,  # without the multi-token-prediction module
}
# Published non-embedding counts, rounded as published (model cards / Gemma 3 report, in billions).
NON_EMBEDDING_ROUNDED = {
    "qwen3-0.6b": (0.44, 0.005),
    "qwen3-1.7b": (1.4, 0.05),
    "qwen3-4b": (3.6, 0.05),
    "qwen3-8b": (6.95, 0.005),
    "qwen3-14b": (13.2, 0.05),
    "qwen3-32b": (31.2, 0.05),
    "gemma3-4b": (3.209, 0.0005),
    "gemma3-12b": (10.759, 0.0005),
    "gemma3-27b": (25.600, 0.0005),
    "qwen3-30b-a3b": (29.9, 0.05),
    "qwen3-235b-a22b": (234.0, 0.5),
}
# Published total (rounded) and active (truncated: Qwen's 3.35 B is "3.3B activated") parameters of
# MoE models, from the model cards, in billions: (total, half unit), (active, unit).
MOE_ROUNDED = {
    "mixtral-8x22b": ((141.0, 0.5), (39.0, 1.0)),
    "qwen3-30b-a3b": ((30.5, 0.05), (3.3, 0.1)),
    "qwen3-235b-a22b": ((235.0, 0.5), (22.0, 1.0)),
    "deepseek-v2": ((236.0, 0.5), (21.0, 1.0)),
    "deepseek-v3": ((671.0, 0.5), (37.0, 1.0)),
    # these publish active counts with the output head but not the input embedding: checked below
    "deepseek-v2-lite": ((15.7, 0.05), None),
    "gpt-oss-20b": ((20.91, 0.005), None),  # OpenAI's model card: 20.91B total, 3.61B active
    "gpt-oss-120b": ((116.83, 0.005), None),  # 116.83B total, 5.13B active
}
ACTIVE_WITHOUT_INPUT_EMBEDDING = {
    "deepseek-v2-lite": (2.4, 0.1),  # "2.4B activated", truncated
    "gpt-oss-20b": (3.61, 0.005),
    "gpt-oss-120b": (5.13, 0.005),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_published_parameter_count(name):
    assert count_params(load_config(name)) == EXACT[name]


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING_ROUNDED))
def test_published_non_embedding_count(name):
    cfg = load_config(name)
    expected, half_unit = NON_EMBEDDING_ROUNDED[name]
    non_embedding = count_params(cfg, exclude_embeddings=True)
    if not cfg.tie_embeddings:
        non_embedding -= cfg.emb_dim * cfg.vocab_size  # the output head counts as embedding
    assert abs(non_embedding / 1e9 - expected) <= half_unit


@pytest.mark.parametrize("name", sorted(MOE_ROUNDED))
def test_published_total_and_active_moe_counts(name):
    cfg = load_config(name)
    (total, t_half), active_published = MOE_ROUNDED[name]
    assert abs(count_params(cfg) / 1e9 - total) <= t_half
    if active_published is None:
        return
    active, a_unit = active_published
    assert 0 <= count_params(cfg, active=True) / 1e9 - active < a_unit


@pytest.mark.parametrize("name", sorted(ACTIVE_WITHOUT_INPUT_EMBEDDING))
def test_published_active_counts_without_the_input_embedding(name):
    cfg = load_config(name)
    published, unit = ACTIVE_WITHOUT_INPUT_EMBEDDING[name]
    without_input_embedding = count_params(cfg, active=True) - cfg.vocab_size * cfg.emb_dim
    assert -unit < without_input_embedding / 1e9 - published < unit


def test_gpt3_175b():
    assert abs(count_params(load_config("gpt3-175b")) / 1e9 - 175.0) < 0.5


TINY = [
    "num_layers=5",
    "emb_dim=64",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=16",
    "mlp_dim=96",
    "vocab_size=97",
    "max_position_embeddings=64",
    "seq_len=32",
]
FAMILIES = [
    "llama3.1-8b",
    "mistral-7b",
    "qwen3-0.6b",
    "gemma-2b",
    "gemma2-2b",
    "gemma3-1b",
    "gpt3-175b",
]


def tiny(name, *extra):
    overrides = [*TINY, *extra]
    if name in ("mistral-7b", "gemma2-2b", "gemma3-1b"):
        overrides.append("sliding_window=5")
    if name == "gemma-2b":
        overrides.remove("num_kv_heads=2")
    return load_config(name, overrides)


def _tokens(b=2, s=13, vocab=97, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("name", FAMILIES)
def test_scan_equals_loop_and_chunked_equals_dot_product(name):
    cfg = tiny(name)
    model = build_model(cfg, rngs=nnx.Rngs(1))
    ids = _tokens()
    ref = model(ids)
    assert ref.shape == (2, 13, 97) and ref.dtype == jnp.float32
    model.cfg = cfg.replace(scan_layers=False)  # the layer loop is driven by the top-level cfg
    np.testing.assert_allclose(model(ids), ref, atol=1e-5, rtol=1e-5)
    chunked = build_model(
        tiny(name, "attention_backend=chunked", "attention_chunk_size=4"), rngs=nnx.Rngs(1)
    )
    np.testing.assert_allclose(chunked(ids), ref, atol=1e-5, rtol=1e-5)


def _decode(model, ids, cache, prompt=7):
    """Prefill `prompt` tokens, then one token at a time; returns all logits."""
    n = ids.shape[1]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), ids.shape)
    logits, cache = model.forward_with_cache(ids[:, :prompt], pos[:, :prompt], cache)
    steps = [logits]
    for t in range(prompt, n):
        logits, cache = model.forward_with_cache(ids[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("name", ["llama3.1-8b", "gemma3-1b"])
def test_incremental_decode_matches_full_forward(name):
    cfg = tiny(name)
    model = build_model(cfg, rngs=nnx.Rngs(2))
    ids = _tokens(s=11)
    full = model(ids)
    out = _decode(model, ids, model.init_cache(2, 16))
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=1e-5)
    # the decode view (per-group arrays, its own cache layout) runs the same forward
    view = unstack_layers(model)
    np.testing.assert_allclose(
        _decode(view, ids, view.init_cache(2, 16)), full, atol=1e-5, rtol=1e-5
    )
    # with panel-packed weights (llm-serve's CPU decode view) too, every Linear but routers packed
    n_linears = sum(isinstance(m, Linear) for _, m in iter_linears(view))
    assert pack_linears(view) == n_linears > 0
    assert not any(isinstance(m, Linear) for _, m in iter_linears(view))
    np.testing.assert_allclose(
        _decode(view, ids, view.init_cache(2, 16)), full, atol=1e-5, rtol=1e-5
    )


def test_bfloat16_weights_pack_and_decode_like_the_full_forward():
    """bfloat16 Linear weights are packed as bfloat16 panels (multiplied in float32)."""
    cfg = tiny("llama3.1-8b").replace(dtype="bfloat16", weight_dtype="bfloat16")
    model = build_model(cfg, rngs=nnx.Rngs(3))
    ids = _tokens(s=9)
    full = model(ids).astype(jnp.float32)
    view = unstack_layers(model)
    n_linears = sum(isinstance(m, Linear) for _, m in iter_linears(view))
    assert pack_linears(view) == n_linears > 0
    panels = [m.panels[...] for _, m in nnx.iter_graph(view) if isinstance(m, PackedLinear)]
    assert panels and all(p.dtype == jnp.bfloat16 for p in panels)
    out = _decode(view, ids, view.init_cache(2, 16)).astype(jnp.float32)
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(out - full).max()) < 0.05 * scale


@pytest.mark.parametrize("name", ["llama3.1-8b", "gemma2-2b"])
def test_paged_decode_through_the_kernel_equals_contiguous(name, monkeypatch):
    """One-token steps over a paged cache are read in place by llm_kernels.paged_attention (here
    the Pallas kernel in interpret mode); pages are handed out out of order on purpose."""
    import functools

    import llm_kernels

    monkeypatch.setattr(
        llm_kernels,
        "paged_attention",
        functools.partial(llm_kernels.paged_attention, interpret=True),
    )
    cfg = tiny(name, "attn_logit_softcap=30.0")
    model = build_model(cfg, rngs=nnx.Rngs(3))
    ids = _tokens(s=12)
    contiguous = _decode(model, ids, model.init_cache(2, 16))
    paged = model.init_cache(2, 16, kind="paged", num_pages=9, page_size=4)
    table = np.array([[5, 2, 8, 1], [3, 7, 4, 6]], np.int32)
    from llm_core import map_layer_caches

    paged = map_layer_caches(lambda c: c.with_table(table), paged)
    np.testing.assert_allclose(_decode(model, ids, paged), contiguous, atol=1e-5, rtol=1e-5)


def test_packed_segments_match_separate_sequences():
    cfg = tiny("llama3.1-8b")
    model = build_model(cfg, rngs=nnx.Rngs(4))
    a, b = _tokens(1, 6, seed=1), _tokens(1, 7, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([jnp.arange(6), jnp.arange(7)])[None].astype(jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 7], jnp.int32)
    out = model(packed, positions, segments)
    np.testing.assert_allclose(out[:, :6], model(a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 6:], model(b), atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_close_to_float32():
    cfg = tiny("llama3.1-8b")
    model = build_model(cfg, rngs=nnx.Rngs(5))
    ids = _tokens()
    ref = model(ids)
    _graphdef, state = nnx.split(model)
    bf16 = build_model(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(5))
    nnx.update(bf16, state)
    out = bf16(ids)
    assert out.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: logits of O(0.1) agree to ~2e-2 absolute.
    np.testing.assert_allclose(out, ref, atol=2e-2)


def test_deepseek_v3_with_its_multi_token_prediction_module():
    """The release's 685B: 671B + one MTP module (a MoE decoder layer, two norms, eh_proj and the
    head norm) + the checkpoint's copies of the embedding and output head (684.49B; the Hub's
    684.53B also counts FP8 scale tensors)."""
    cfg = load_config("deepseek-v3", ["mtp_num_layers=1"])
    with_copies = count_params(cfg) + 2 * cfg.vocab_size * cfg.emb_dim
    assert abs(with_copies / 1e9 - 684.49) < 0.005
    assert count_params(cfg) - EXACT["deepseek-v3"] > 11e9  # one MoE layer's worth


def test_mtp_modules_follow_the_main_model():
    import jax.numpy as jnp

    cfg = load_config(
        None,
        ["num_layers=2", "emb_dim=32", "num_heads=4", "mlp_dim=48", "vocab_size=64",
         "mtp_num_layers=2"],
    )  # fmt: skip
    model = build_model(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    x, _, _ = model.hidden(ids)
    depths = model.mtp_hidden(x, ids, jnp.broadcast_to(jnp.arange(9), (2, 9)))
    assert len(depths) == 2 and all(h.shape == x.shape for h in depths)
    # causal: depth 0 at position i sees tokens up to i + 1 only
    other = ids.at[:, 6].set((ids[:, 6] + 1) % 64)
    x2, _, _ = model.hidden(other)
    d2 = model.mtp_hidden(x2, other, jnp.broadcast_to(jnp.arange(9), (2, 9)))
    np.testing.assert_allclose(np.asarray(depths[0][:, :5]), np.asarray(d2[0][:, :5]), atol=1e-6)
    assert np.abs(np.asarray(depths[0][:, 5]) - np.asarray(d2[0][:, 5])).max() > 1e-6
    assert model.mtp_logits(1, depths[1]).shape == (2, 9, 64)
