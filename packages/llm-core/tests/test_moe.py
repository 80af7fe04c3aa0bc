"""MoE feed-forward and layer kinds: dropless = per-expert loop (values and gradients), capacity paths,
placement of mixed dense/MoE layers, auxiliary outputs through the scan, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_core import ConfigError, build_model, count_params, layer_placement, load_config
from llm_core.layers.moe import MoE

TINY_MOE = [
    "num_layers=4",
    "emb_dim=32",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=8",
    "mlp_dim=48",
    "vocab_size=64",
    "ffn_kind=moe",
    "num_experts=4",
    "num_experts_per_tok=2",
    "moe_mlp_dim=24",
]


def _cfg(*extra):
    return load_config(None, [*TINY_MOE, *extra])


def _loop_reference(moe: MoE, x, capacity=None):
    """Per-token, per-expert loop in numpy; with `capacity`, assignments are served in token order
    and those beyond an expert's capacity add nothing."""
    tokens = np.asarray(x.reshape(-1, x.shape[-1]), np.float64)
    w_router = np.asarray(moe.router.kernel[...], np.float64)
    gate, up, down = (np.asarray(m.kernel[...], np.float64) for m in (moe.gate, moe.up, moe.down))
    logits = tokens @ w_router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    used = np.zeros(moe.num_experts, int)
    out = np.zeros_like(tokens)
    for t, row in enumerate(tokens):
        top = np.argsort(-probs[t], kind="stable")[: moe.routing.k]
        w = probs[t, top] / (probs[t, top].sum() if moe.routing.normalize else 1.0)
        for weight, e in zip(w, top, strict=True):
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            h = row @ gate[e]
            h = h / (1 + np.exp(-h)) * (row @ up[e])
            out[t] += weight * (h @ down[e])
    return out.reshape(x.shape)


# (matmul, tokens per row): 9 tokens -> 9 rows per expert (ragged_dot below MIN_ROWS_FOR_TILES);
# 40 tokens -> 40 rows per expert on average: 32-row tiles, with partly filled ones
DROPLESS_CASES = [
    ("grouped_matmul", 9),
    ("grouped_matmul", 40),
    ("dense", 9),
    ("ragged_dot", 9),
    ("ragged_dot", 40),
    ("tiled", 9),
    ("tiled", 40),
    ("tiled", 150),
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("matmul", "seq"), DROPLESS_CASES)
def test_dropless_equals_per_expert_loop(normalize, matmul, seq):
    cfg = _cfg(f"norm_topk_prob={str(normalize).lower()}", f"moe_matmul={matmul}")
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, seq, 32))
    y, aux = moe(x)
    np.testing.assert_allclose(y, _loop_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert float(aux["moe_tokens_per_expert"].sum()) == 2 * seq * 2
    assert float(aux["moe_dropped"]) == 0


@pytest.mark.parametrize(
    ("matmul", "seq"),
    [("grouped_matmul", 7), ("grouped_matmul", 70), ("ragged_dot", 7), ("tiled", 70)],
)
def test_dropless_gradients_equal_dense_per_expert_computation(matmul, seq):
    """Gradients through the grouped matmuls match a dense formulation (every expert on every
    token, masked)."""
    cfg = _cfg(f"moe_matmul={matmul}")
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, seq, 32))
    graphdef, state = nnx.split(moe)

    def dense(state, x):
        m = nnx.merge(graphdef, state)
        tokens = x.reshape(-1, 32)
        from llm_core.layers.moe import route

        weights, experts, _ = route(m.router(tokens), m.routing)
        combine = (
            jnp.zeros((tokens.shape[0], m.num_experts))
            .at[jnp.arange(tokens.shape[0])[:, None], experts]
            .add(weights)
        )
        h = jax.nn.silu(jnp.einsum("td,edm->tem", tokens, m.gate.kernel[...]))
        h = h * jnp.einsum("td,edm->tem", tokens, m.up.kernel[...])
        y = jnp.einsum("tem,emd,te->td", h, m.down.kernel[...], combine)
        return jnp.sum(jnp.sin(y))

    def ours(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)[0].reshape(-1, 32)))

    if matmul == "tiled":  # the tiled path is the one taken
        from llm_core.layers.experts import MIN_ROWS_FOR_TILES

        assert seq * 2 / 4 >= MIN_ROWS_FOR_TILES

    g_ref = jax.grad(dense, argnums=(0, 1))(state, x)
    g_ours = jax.grad(ours, argnums=(0, 1))(state, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_ours, g_ref)


def test_capacity_path_with_enough_capacity_equals_dropless():
    x = jax.random.normal(jax.random.key(3), (2, 8, 32))
    dropless = MoE(_cfg(), rngs=nnx.Rngs(0))
    capacity = MoE(_cfg("moe_capacity_factor=4.0"), rngs=nnx.Rngs(0))  # capacity = all tokens
    y_ref, _ = dropless(x)
    y, aux = capacity(x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert float(aux["moe_dropped"]) == 0


def test_low_capacity_drops_assignments_in_token_order():
    cfg = _cfg("moe_capacity_factor=0.25")  # ceil(0.25 * 16 * 2 / 4) = 2 assignments per expert
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 16, 32))
    y, aux = moe(x)
    np.testing.assert_allclose(y, _loop_reference(moe, x, capacity=2), atol=1e-5, rtol=1e-5)
    assert float(aux["moe_dropped"]) == 16 * 2 - 4 * 2
    # a token none of whose assignments fit contributes zeros: it passes through on the residual
    assert np.any(np.all(np.asarray(y[0]) == 0, axis=-1))


def test_placement_of_mixed_dense_and_moe_layers():
    # Qwen3-MoE style: decoder_sparse_step 2 and mlp_only_layers
    cfg = _cfg("num_layers=6", "moe_layer_interval=2", "mlp_only_layers=[3]")
    kinds = [k.ffn for seg in layer_placement(cfg).segments for k in seg.kinds * seg.repeats]
    assert kinds == ["dense", "moe", "dense", "dense", "dense", "moe"]
    # DeepSeek style: the first k layers dense, then every layer MoE
    p = layer_placement(_cfg("num_layers=5", "first_num_dense_layers=2"))
    assert [(s.name, s.repeats, len(s.kinds)) for s in p.segments] == [
        ("dense_groups", 2, 1),
        ("groups", 3, 1),
    ]
    assert p.locate(1) == ("dense_groups", 0, 1) and p.locate(4) == ("groups", 0, 2)
    # interleaved with a local/global attention pattern: the period is the lcm, plus a tail
    p = layer_placement(
        _cfg("num_layers=7", "moe_layer_interval=2", "attention_pattern=[local,local,global]",
             "sliding_window=4")
    )  # fmt: skip
    assert [(s.name, s.repeats, len(s.kinds), s.stacked) for s in p.segments] == [
        ("groups", 1, 6, True),
        ("tail", 1, 1, False),
    ]


def test_moe_model_scan_equals_loop_and_returns_aux():
    cfg = _cfg("num_layers=5", "moe_layer_interval=2", "first_num_dense_layers=1")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, 64)
    logits, _, aux = model.forward(ids)
    model.cfg = cfg.replace(scan_layers=False)
    logits2, _, aux2 = model.forward(ids)
    np.testing.assert_allclose(logits2, logits, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), aux, aux2)
    # layers 1 and 3 are MoE: 2 layers x 20 tokens x top-2 assignments
    assert float(aux["moe_tokens_per_expert"].sum()) == 2 * 20 * 2
    assert np.isfinite(float(aux["moe_lb_loss"])) and float(aux["moe_lb_loss"]) > 0
    # decoding through the cache gives the full forward's logits on an MoE model too
    cache = model.init_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    out, cache = model.forward_with_cache(ids[:, :6], pos[:, :6], cache)
    steps = [out]
    for t in range(6, 10):
        out, cache = model.forward_with_cache(ids[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), logits, atol=1e-5, rtol=1e-5)


def test_active_parameter_count():
    cfg = _cfg()
    total, active = count_params(cfg), count_params(cfg, active=True)
    per_layer_experts = 3 * 4 * 32 * 24
    assert total - active == 4 * per_layer_experts // 2  # 4 MoE layers, 2 of 4 experts idle


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["ffn_kind=sparse"], "ffn_kind"),
        (["moe_matmul=magic"], "moe_matmul"),
        (["num_experts_per_tok=5"], "num_experts_per_tok"),
        (["mlp_only_layers=[4]"], "mlp_only_layers"),
        (["num_experts=0"], "num_experts"),
        (["ici_expert_parallelism=3", "ici_fsdp_parallelism=1"], "num_experts"),
        (["ici_stage_parallelism=2", "num_pipeline_repeats=4"], "num_pipeline_repeats \\(4\\)"),
        (["ici_context_parallelism=2", "attention_backend=flash"], "dcn_context_parallelism"),
        (["ici_context_parallelism=3", "ici_fsdp_parallelism=1"], "seq_len"),
        (["ici_sequence_parallelism=3", "ici_fsdp_parallelism=1"], "ici_sequence_parallelism"),
    ],
)
def test_bad_moe_and_mesh_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(*overrides)


def test_auto_matmul_is_the_grouped_kernel_on_cpu_when_built():
    import llm_kernels
    from llm_core.layers.experts import resolve_matmul

    want = "grouped_matmul" if llm_kernels.cpu_kernels_available() else "tiled"
    assert resolve_matmul("auto") == want
    assert resolve_matmul("ragged_dot") == "ragged_dot"


GPT_OSS_MOE = (
    "router_kind=topk_softmax", "moe_router_bias=true", "moe_expert_bias=true",
    "moe_gating=clamped_swiglu", "swiglu_limit=0.3",
)  # fmt: skip


def _gpt_oss_reference(moe: MoE, x):
    """GPT-OSS's expert loop in numpy: top k biased logits, softmax over them, biased experts,
    (clip(up) + 1) * g * sigmoid(1.702 g) with g = min(gate, limit)."""
    tokens = np.asarray(x.reshape(-1, x.shape[-1]), np.float64)
    p = {n: np.asarray(getattr(moe, n).kernel[...], np.float64) for n in ("gate", "up", "down")}
    b = {n: np.asarray(getattr(moe, n).bias[...], np.float64) for n in ("gate", "up", "down")}
    logits = tokens @ np.asarray(moe.router.kernel[...]) + np.asarray(moe.router.bias[...])
    out = np.zeros_like(tokens)
    for t, row in enumerate(tokens):
        top = np.argsort(-logits[t], kind="stable")[: moe.routing.k]
        w = np.exp(logits[t, top] - logits[t, top].max())
        for weight, e in zip(w / w.sum(), top, strict=True):
            g = np.minimum(row @ p["gate"][e] + b["gate"][e], 0.3)
            u = np.clip(row @ p["up"][e] + b["up"][e], -0.3, 0.3)
            h = (u + 1) * g / (1 + np.exp(-1.702 * g))
            out[t] += weight * (h @ p["down"][e] + b["down"][e])
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    ("matmul", "seq"), [*DROPLESS_CASES, ("capacity", 9)], ids=lambda v: str(v)
)
def test_gpt_oss_experts_equal_their_loop(matmul, seq):
    """Router bias, top-k-then-softmax, per-expert biases and the clamped SwiGLU on every path."""
    extra = ("moe_capacity_factor=4.0",) if matmul == "capacity" else (f"moe_matmul={matmul}",)
    moe = MoE(_cfg(*GPT_OSS_MOE, *extra), rngs=nnx.Rngs(0))
    for lin in (moe.router, moe.gate, moe.up, moe.down):  # biases start at zero: perturb them
        lin.bias[...] = 0.2 * jax.random.normal(jax.random.key(5), lin.bias.shape)
    x = jax.random.normal(jax.random.key(1), (2, seq, 32))
    np.testing.assert_allclose(moe(x)[0], _gpt_oss_reference(moe, x), atol=1e-5, rtol=1e-5)
