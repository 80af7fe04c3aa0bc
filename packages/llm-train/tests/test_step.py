import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps, token_loss


def make_steps(cfg):
    return Steps(cfg, build_mesh(cfg, jax.devices()[:1]), make_optimizer(cfg))


def batch(cfg, seed=0, seg=None):
    rng = np.random.default_rng(seed)
    b, s = cfg.global_batch_size, cfg.seq_len
    ids = rng.integers(0, cfg.vocab_size, (b, s + 1)).astype(np.int32)
    seg = np.ones((b, s), np.int32) if seg is None else seg
    pos = np.zeros_like(seg)
    for r in range(b):
        for i in range(1, s):
            pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
    nxt = np.concatenate([seg[:, 1:], np.zeros((b, 1), np.int32)], 1)
    weights = ((seg == nxt) & (seg > 0)).astype(np.float32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": pos,
        "segment_ids": seg,
        "weights": weights,
    }


def test_token_loss_ignores_padding_and_normalises_by_real_tokens():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets = jnp.array([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])
    w = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.float32)
    nll, zl, n = token_loss(logits, targets, w)
    logp = jax.nn.log_softmax(logits)
    want = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 2, 3] + logp[1, 0, 0])
    np.testing.assert_allclose(float(nll), float(want), rtol=1e-6)
    assert float(n) == 4 and float(zl) == 0
    # targets where the weight is 0 do not matter
    nll2, _, _ = token_loss(logits, targets.at[0, 4].set(6), w)
    assert float(nll2) == float(nll)
    _, zl, _ = token_loss(logits, targets, w, z_loss=1e-2)
    lz = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(float(zl), 1e-2 * float(jnp.sum(lz**2 * w)), rtol=1e-6)


def test_deterministic_init_and_step(tmp_path):
    cfg = tiny_config(tmp_path)
    s = make_steps(cfg)
    a, b = s.init(), s.init()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    bt = batch(cfg)
    _, ma = s.train_step(a, bt)
    _, mb = s.train_step(b, bt)
    assert float(ma["loss"]) == float(mb["loss"])


def test_weight_dtype_is_param_dtype(tmp_path):
    cfg16 = tiny_config(tmp_path, weight_dtype="bfloat16", dtype="bfloat16")
    leaves = jax.tree.leaves(make_steps(cfg16).abstract_state["params"])
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_grad_accumulation_matches_big_batch(tmp_path):
    """Uneven real-token counts per microbatch: normalising by all real tokens still matches."""
    # SGD keeps the update linear in the gradient (Adam's first step is sign-like and amplifies
    # float rounding in near-zero gradient entries).
    opt = {"warmup_steps": 0, "optimizer": "sgd", "adam_b1": 0.0, "lr_schedule": "constant"}
    cfg1 = tiny_config(tmp_path, **opt)
    cfg2 = tiny_config(tmp_path, grad_accum_steps=2, **opt)
    seg = np.ones((8, 32), np.int32)
    seg[0, 20:] = 0  # padding in some rows only
    seg[3, 5:] = 2
    bt = batch(cfg1, seed=1, seg=seg)
    s1, s2 = make_steps(cfg1), make_steps(cfg2)
    st1, m1 = s1.train_step(s1.init(), bt)
    st2, m2 = s2.train_step(s2.init(), bt)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    assert float(m1["tokens"]) == float(m2["tokens"]) == float(bt["weights"].sum())
    for x, y in zip(jax.tree.leaves(st1["params"]), jax.tree.leaves(st2["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_packed_segments_do_not_see_each_other(tmp_path):
    """Changing the first document of a packed row leaves the second document's loss unchanged."""
    cfg = tiny_config(tmp_path, global_batch_size=2)
    s = make_steps(cfg)
    state = s.init()
    seg = np.ones((2, 32), np.int32)
    seg[:, 16:] = 2
    a = batch(cfg, seed=2, seg=seg)
    b = {k: v.copy() for k, v in a.items()}
    b["inputs"][:, :10] = (b["inputs"][:, :10] + 1) % cfg.vocab_size
    second = {**a, "weights": a["weights"] * (seg == 2)}
    second_b = {**b, "weights": b["weights"] * (seg == 2)}
    la = float(s.eval_step(state, second)["nll"])
    lb = float(s.eval_step(state, second_b)["nll"])
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    first_a = float(s.eval_step(state, {**a, "weights": a["weights"] * (seg == 1)})["nll"])
    first_b = float(s.eval_step(state, {**b, "weights": b["weights"] * (seg == 1)})["nll"])
    assert abs(first_a - first_b) > 1e-4  # the change is visible inside its own segment


def test_remat_policies_give_the_same_step(tmp_path):
    bt = batch(tiny_config(tmp_path))
    out = {}
    for policy in ("none", "full", "save_dots"):
        s = make_steps(tiny_config(tmp_path, remat_policy=policy, warmup_steps=0))
        _, m = s.train_step(s.init(), bt)
        out[policy] = (float(m["loss"]), float(m["grad_norm"]))
    for policy in ("full", "save_dots"):
        np.testing.assert_allclose(out[policy], out["none"], rtol=1e-5)


MOE = {"ffn_kind": "moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_mlp_dim": 32}


def test_moe_router_losses_enter_the_loss_with_their_weights(tmp_path):
    """The step's gradient includes weight x load-balancing loss + weight x z-loss, and the router
    statistics are returned as metrics."""
    bt = batch(tiny_config(tmp_path))
    plain = make_steps(tiny_config(tmp_path, warmup_steps=0, **MOE))
    weighted = make_steps(
        tiny_config(tmp_path, warmup_steps=0, moe_aux_loss_weight=0.5, moe_z_loss_weight=0.1, **MOE)
    )
    state = plain.init()
    _, m0 = plain.train_step(jax.tree.map(jnp.copy, state), bt)  # steps donate their state
    _, m1 = weighted.train_step(jax.tree.map(jnp.copy, state), bt)
    for key in ("moe_lb_loss", "moe_z_loss", "moe_max_load", "moe_dropped_fraction"):
        assert key in m0 and np.isfinite(float(m0[key])), key
    assert float(m0["moe_max_load"]) >= 1.0 and float(m0["moe_dropped_fraction"]) == 0.0
    # the nll is the same, the gradient is not: the router losses moved it
    np.testing.assert_allclose(float(m0["loss"]), float(m1["loss"]), rtol=1e-6)
    assert abs(float(m0["grad_norm"]) - float(m1["grad_norm"])) > 1e-6

    # and the gradient is exactly that of nll + weights x router losses (per token)
    params = state["params"]

    def objective(params):
        from flax import nnx

        model = nnx.merge(weighted.graphdef, params, state["rest"])
        logits, _, aux = model.forward(bt["inputs"], bt["positions"], bt["segment_ids"])
        nll, _, count = token_loss(logits, bt["targets"], bt["weights"])
        return nll / count + 0.5 * aux["moe_lb_loss"] + 0.1 * aux["moe_z_loss"]

    want = float(optax_norm(jax.grad(objective)(params)))
    np.testing.assert_allclose(float(m1["grad_norm"]), want, rtol=1e-4)


def optax_norm(tree):
    import optax

    return optax.tree.norm(tree)


def test_moe_grad_accumulation_matches_big_batch(tmp_path):
    opt = {"warmup_steps": 0, "optimizer": "sgd", "adam_b1": 0.0, "lr_schedule": "constant"}
    cfg1 = tiny_config(tmp_path, moe_aux_loss_weight=0.01, **opt, **MOE)
    cfg2 = tiny_config(tmp_path, grad_accum_steps=2, moe_aux_loss_weight=0.01, **opt, **MOE)
    bt = batch(cfg1, seed=3)
    s1, s2 = make_steps(cfg1), make_steps(cfg2)
    _, m1 = s1.train_step(s1.init(), bt)
    _, m2 = s2.train_step(s2.init(), bt)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    assert "moe_lb_loss" in m2


SIGMOID_MOE = {
    "ffn_kind": "moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_mlp_dim": 16,
    "router_kind": "sigmoid_topk", "warmup_steps": 0,
}  # fmt: skip


def _set_router_bias(state, value):
    def put(path, leaf):
        if any(getattr(p, "key", None) == "router_bias" for p in path):
            return jnp.broadcast_to(jnp.asarray(value, leaf.dtype), leaf.shape)
        return leaf

    return dict(state, rest=jax.tree_util.tree_map_with_path(put, state["rest"]))


def test_aux_loss_free_balancing_evens_out_an_imbalanced_router(tmp_path):
    """Biases favouring experts 0 and 1 send them nearly every token (max load ~4x the even share);
    with router_bias_update_rate the bias update (not the optimizer) spreads the load, without it
    the imbalance stays. The bias is outside the trained parameters and only moves by the rule."""
    favour = np.array([0.2, 0.2] + [0.0] * 6, np.float32)
    final = {}
    for rate in (0.0, 0.01):
        cfg = tiny_config(tmp_path, router_bias_update_rate=rate, **SIGMOID_MOE)
        steps = make_steps(cfg)
        state = _set_router_bias(steps.init(), favour)
        assert not any(
            "router_bias" in jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])
        )
        loads = []
        for i in range(30):
            state, metrics = steps.train_step(state, batch(cfg, seed=i))
            loads.append(float(metrics["moe_max_load"]))
        final[rate] = (loads, state)
    still, balanced = final[0.0][0], final[0.01][0]
    assert min(still[0], balanced[0]) > 3.5  # both start imbalanced
    assert np.mean(still[-10:]) > 3.5
    assert np.mean(balanced[-10:]) < 2.0
    # each update moves every bias by exactly +-rate (or 0 for an expert at the mean load)
    bias = [
        np.asarray(leaf)
        for p, leaf in jax.tree_util.tree_leaves_with_path(final[0.01][1]["rest"])
        if "router_bias" in jax.tree_util.keystr(p)
    ]
    steps_moved = (favour - bias[0]) / 0.01
    np.testing.assert_allclose(steps_moved, np.round(steps_moved), atol=1e-3)


def test_balancing_moves_the_multi_token_prediction_routers_too(tmp_path):
    """A DeepSeek-V3-style MTP module on an MoE model has its own router bias: the load of the
    tokens it routes moves it by +-rate per step, like the decoder's."""
    cfg = tiny_config(tmp_path, router_bias_update_rate=0.01, **SIGMOID_MOE, mtp_num_layers=1)
    steps = make_steps(cfg)
    state = steps.init()

    def biases(state) -> dict:
        return {
            jax.tree_util.keystr(p): np.asarray(leaf)
            for p, leaf in jax.tree_util.tree_leaves_with_path(state["rest"])
            if "router_bias" in jax.tree_util.keystr(p)
        }

    before = biases(state)
    mtp = [k for k in before if "mtp_0" in k]
    assert len(mtp) == 1 and len(before) > 1
    state, _ = steps.train_step(state, batch(cfg, seed=0))
    moved = (biases(state)[mtp[0]] - before[mtp[0]]) / 0.01
    assert abs(np.abs(moved).max() - 1.0) < 1e-3  # it moved, by exactly one step
    np.testing.assert_allclose(moved, np.round(moved), atol=1e-3)


MTP = {"mtp_num_layers": 2, "warmup_steps": 0}


def test_multi_token_prediction_loss_is_trained_and_logged(tmp_path):
    """mtp_loss (logged) is the mean over depths of each depth's cross-entropy on the tokens 2 and
    3 ahead, never across a packed-sequence boundary; it enters the gradient with its factor."""
    cfg = tiny_config(tmp_path, mtp_loss_scaling_factor=0.5, **MTP)
    seg = np.repeat(np.array([[1] * 10 + [2] * 6]), cfg.global_batch_size, 0)[:, : cfg.seq_len]
    seg = np.pad(seg, ((0, 0), (0, cfg.seq_len - seg.shape[1])), constant_values=3)
    bt = batch(cfg, seed=4, seg=seg)
    steps = make_steps(cfg)
    state = steps.init()
    _, metrics = steps.train_step(jax.tree.map(jnp.copy, state), bt)

    from flax import nnx

    model = nnx.merge(steps.graphdef, state["params"], state["rest"])
    x, _, _ = model.hidden(bt["inputs"], bt["positions"], bt["segment_ids"])
    depths = model.mtp_hidden(x, bt["inputs"], bt["positions"], bt["segment_ids"])
    want = []
    for k, h in enumerate(depths):
        logp = np.asarray(jax.nn.log_softmax(model.mtp_logits(k, h), -1))
        total, n = 0.0, 0
        for b in range(bt["inputs"].shape[0]):
            for i in range(cfg.seq_len - k - 1):
                same = bt["segment_ids"][b, i] == bt["segment_ids"][b, i + k + 2 - 1]
                if same and all(bt["weights"][b, i : i + k + 2]):
                    total -= logp[b, i, bt["targets"][b, i + k + 1]]
                    n += 1
        want.append(total / n)
    np.testing.assert_allclose(float(metrics["mtp_loss"]), np.mean(want), rtol=1e-4)

    off = make_steps(tiny_config(tmp_path, mtp_loss_scaling_factor=0.0, **MTP))
    _, m0 = off.train_step(jax.tree.map(jnp.copy, state), bt)
    np.testing.assert_allclose(float(m0["loss"]), float(metrics["loss"]), rtol=1e-6)
    assert abs(float(m0["grad_norm"]) - float(metrics["grad_norm"])) > 1e-5
