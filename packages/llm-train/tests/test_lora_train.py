"""LoRA training: only the adapters get gradients and optimizer state; the base stays frozen; the
export is the merged plain model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from llm_core import load
from llm_train.export import export
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
from llm_train.trainer import train

pytestmark = pytest.mark.cpu


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def test_only_adapters_train_and_hold_optimizer_state(tmp_path):
    cfg = tiny_config(tmp_path, lora_rank=4, run_name="lora", steps=8, learning_rate=1e-2)
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = steps.init()
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    adapters = _size(state["params"])
    # AdamW keeps two moments per trained parameter (plus scalar counts): adapters only
    assert 2 * adapters <= _size(state["opt_state"]) <= 2 * adapters + 8
    base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(state["rest"]))

    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < losses[0]

    from llm_train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "runs" / "lora" / "checkpoints"), use_async=False)
    trained, _ = ckpt.restore(steps.abstract_with_sharding())
    ckpt.close()
    base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(trained["rest"]))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)  # frozen

    exported = load(export(cfg, str(tmp_path / "export")))
    assert exported.cfg.lora_rank == 0
    model = nnx.merge(steps.graphdef, trained["params"], trained["rest"])
    ids = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(model(ids)), atol=2e-5)


def test_qlora_trains_adapters_over_a_frozen_int8_base(tmp_path):
    cfg = tiny_config(
        tmp_path, lora_rank=4, lora_base_quantization="int8", run_name="qlora", steps=8,
        learning_rate=1e-2,
    )  # fmt: skip
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = steps.init()
    kernels = [x for x in jax.tree.leaves(state["rest"]) if x.dtype == np.int8]
    assert kernels  # the adapted bases are stored as int8
    assert all(n.endswith(("lora_a", "lora_b")) for n in (
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])))  # fmt: skip
    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < losses[0]
    exported = load(export(cfg, str(tmp_path / "export")))
    assert exported.cfg.lora_rank == 0 and exported.cfg.lora_base_quantization == "none"


def test_qlora_init_from_quantizes_the_source(tmp_path):
    from llm_train.init_from import state_from

    src_cfg = tiny_config(tmp_path, run_name="src", steps=2)
    train(src_cfg)
    src = export(src_cfg, str(tmp_path / "src_export"))
    cfg = tiny_config(
        tmp_path, run_name="q", init_from=str(src), lora_rank=4, lora_base_quantization="int8"
    )
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = state_from(steps, cfg)
    model = nnx.merge(steps.graphdef, state["params"], state["rest"])
    ids = np.random.default_rng(1).integers(0, 256, (2, 16)).astype(np.int32)
    want = np.asarray(load(src)(ids))
    got = np.asarray(model(ids))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def _step_once(cfg, batch):
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = steps.init()
    ev = jax.device_get(steps.eval_step(state, batch))
    new, metrics = steps.train_step(state, batch)
    return steps, new, jax.device_get(metrics), ev


def test_lora_dropout_acts_in_train_steps_only(tmp_path):
    from test_step import batch

    bt = batch(tiny_config(tmp_path), seed=2)
    runs = {
        p: _step_once(tiny_config(tmp_path, lora_rank=4, lora_dropout=p, grad_accum_steps=2), bt)
        for p in (0.0, 0.3)
    }
    (_, _, m0, e0), (_, _, m1, e1) = runs[0.0], runs[0.3]
    assert float(e0["nll"]) == float(e1["nll"])  # evaluation: no dropout
    # B starts at zero, so dropout cannot change the first loss, only the adapters' gradients
    np.testing.assert_allclose(float(m0["loss"]), float(m1["loss"]), rtol=1e-6)
    assert abs(float(m0["grad_norm"]) - float(m1["grad_norm"])) > 1e-3 * float(m0["grad_norm"])


def test_lora_experts_train_per_expert_adapters_only(tmp_path):
    from test_step import batch

    moe = {"ffn_kind": "moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_mlp_dim": 32}
    cfg = tiny_config(tmp_path, lora_rank=4, lora_experts=True, warmup_steps=0, **moe)
    _, state, metrics, _ = _step_once(cfg, batch(cfg, seed=3))
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state["params"])}
    gate_b = flat["groups/layer_0/mlp/gate/lora_b"][...]
    assert gate_b.shape == (2, 4, 4, 32)  # [layers, experts, rank, out]
    assert np.abs(np.asarray(gate_b)).max() > 0  # the expert adapters trained
    assert all(n.endswith(("lora_a", "lora_b")) for n in flat)
    # AdamW moments for the adapters only, expert adapters included
    assert 2 * _size(state["params"]) <= _size(state["opt_state"]) <= 2 * _size(state["params"]) + 8
    assert np.isfinite(float(metrics["loss"]))
