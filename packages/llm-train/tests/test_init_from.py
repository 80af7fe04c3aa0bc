"""init_from: a run starts from another run's exported weights, with fresh optimizer state."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from llm_core import ConfigError, load
from llm_train.export import export
from llm_train.init_from import state_from
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
from llm_train.trainer import train

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("src")
    cfg = tiny_config(tmp, run_name="src", steps=3)
    train(cfg)
    return str(export(cfg, str(tmp / "export")))


def test_parameters_come_from_the_source_and_the_optimizer_starts_fresh(tmp_path, exported):
    cfg = tiny_config(tmp_path, run_name="ft", init_from=exported)
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = state_from(steps, cfg)
    want = nnx.to_pure_dict(nnx.state(load(exported), nnx.Param))
    got = nnx.to_pure_dict(state["params"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert int(state["step"]) == 0
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)


def test_a_run_with_its_own_checkpoint_resumes_that_instead(tmp_path, exported):
    cfg = tiny_config(tmp_path, run_name="ft", init_from=exported, steps=2)
    train(cfg)
    resumed = train(cfg.replace(steps=4))
    assert resumed.first_step == 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mlp_dim": 96}, r"differs from the source on mlp_dim=96 \(source: 128\)"),
        ({"norm_eps": 1e-5}, r"norm_eps=1e-05 \(source: 1e-06\)"),
    ],
)
def test_architecture_mismatch_names_the_keys(tmp_path, exported, change, match):
    cfg = tiny_config(tmp_path, run_name="bad", init_from=exported, **change)
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    with pytest.raises(ConfigError, match=match):
        state_from(steps, cfg)


def test_missing_source_is_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path, init_from=str(tmp_path / "nowhere"))
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    with pytest.raises(ConfigError, match=r"neither a native checkpoint .* does not exist"):
        state_from(steps, cfg)


def test_lora_run_takes_its_base_weights_from_the_source(tmp_path, exported):
    from llm_core import strip_lora

    cfg = tiny_config(tmp_path, run_name="lora", init_from=exported, lora_rank=4)
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = state_from(steps, cfg)
    model = nnx.merge(steps.graphdef, state["params"], state["rest"])
    got = strip_lora(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    want = nnx.to_pure_dict(nnx.state(load(exported), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    ids = np.arange(12, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(load(exported)(ids)))
