"""Quantized training (qwix): int8 / fp8 / fp8_full runs track the float run's loss over 100 steps
on text, fp8_full uses e4m3 forward and e5m2 backward, and checkpoints stay float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from llm_core import ConfigError
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
from llm_train.trainer import train

pytestmark = pytest.mark.cpu

MARGIN = 0.02  # mean of the last 10 losses within 2% of the float run's


def _data(corpus, tokenizer_file) -> dict:
    return {
        "dataset_kind": "text", "dataset_path": str(corpus / "*.py"),
        "tokenizer_path": str(tokenizer_file), "vocab_size": 512, "steps": 100,
        "warmup_steps": 10, "learning_rate": 3e-3, "checkpoint_every": 0,
    }  # fmt: skip


@pytest.fixture(scope="module")
def float_losses(tmp_path_factory, corpus, tokenizer_file):
    tmp = tmp_path_factory.mktemp("float")
    result = train(tiny_config(tmp, run_name="float", **_data(corpus, tokenizer_file)))
    return [result.losses[s] for s in sorted(result.losses)]


@pytest.mark.parametrize("mode", ["int8", "fp8", "fp8_full"])
def test_quantized_training_tracks_the_float_loss(
    tmp_path, corpus, tokenizer_file, float_losses, mode
):
    cfg = tiny_config(tmp_path, run_name=mode, quantization=mode, **_data(corpus, tokenizer_file))
    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    ours, ref = np.mean(losses[-10:]), np.mean(float_losses[-10:])
    print(f"{mode}: first {losses[0]:.3f} last-10 mean {ours:.4f}; float {ref:.4f}")
    assert ours < losses[0] - 1.0  # it learns
    assert abs(ours - ref) < MARGIN * ref, (ours, ref)
    assert losses != float_losses  # the quantization really ran


def _step_jaxpr(cfg) -> str:
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    state = jax.eval_shape(steps.init)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in steps.abstract_batch().items()}
    return str(jax.make_jaxpr(steps._train_step)(state, batch))


def test_fp8_full_quantizes_forward_to_e4m3_and_backward_to_e5m2(tmp_path):
    full = _step_jaxpr(tiny_config(tmp_path, quantization="fp8_full"))
    fwd_only = _step_jaxpr(tiny_config(tmp_path, quantization="fp8"))
    int8 = _step_jaxpr(tiny_config(tmp_path, quantization="int8"))
    assert "f8_e4m3fn" in full and "f8_e5m2" in full
    assert "f8_e4m3fn" in fwd_only and "f8_e5m2" not in fwd_only
    assert "i8[" in int8 and "f8_" not in int8
    assert "f8_" not in _step_jaxpr(tiny_config(tmp_path)) and "i8[" not in _step_jaxpr(
        tiny_config(tmp_path)
    )


MOE = {"ffn_kind": "moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_mlp_dim": 32}


def test_moe_experts_are_quantized_through_ragged_dot(tmp_path):
    def expert_products(jaxpr: str) -> str:
        return "".join(line for line in jaxpr.splitlines() if "ragged_dot_general[" in line)

    quantized = _step_jaxpr(
        tiny_config(tmp_path, quantization="int8", moe_matmul="ragged_dot", **MOE)
    )
    plain = _step_jaxpr(tiny_config(tmp_path, moe_matmul="ragged_dot", **MOE))
    assert expert_products(quantized) and expert_products(plain)
    # the quantized step's expert products take int8 operands and accumulate in int32
    assert ":i32[" in expert_products(quantized) and ":i32[" not in expert_products(plain)


@pytest.fixture(scope="module")
def float_moe_losses(tmp_path_factory, corpus, tokenizer_file):
    tmp = tmp_path_factory.mktemp("float_moe")
    result = train(tiny_config(tmp, run_name="float", **MOE, **_data(corpus, tokenizer_file)))
    return [result.losses[s] for s in sorted(result.losses)]


@pytest.mark.parametrize("matmul", ["grouped_matmul", "tiled"])
def test_moe_experts_outside_ragged_dot_train_quantized(
    tmp_path, corpus, tokenizer_file, float_moe_losses, matmul
):
    """The grouped-matmul kernel and the tiled einsums (which qwix cannot intercept) run on
    rounded operands (llm_core.layers.qat.ExpertQuantization) and still track the float run."""
    changes = dict(quantization="int8", moe_matmul=matmul, **MOE)
    cfg = tiny_config(tmp_path, run_name=matmul, **changes, **_data(corpus, tokenizer_file))
    result = train(cfg)
    losses = [result.losses[s] for s in sorted(result.losses)]
    ours, ref = np.mean(losses[-10:]), np.mean(float_moe_losses[-10:])
    print(f"MoE {matmul} int8: last-10 mean {ours:.4f}; float {ref:.4f}")
    assert abs(ours - ref) < MARGIN * ref, (ours, ref)
    assert losses != float_moe_losses


def test_parameters_stay_in_the_float_weight_dtype(tmp_path):
    cfg = tiny_config(tmp_path, quantization="int8")
    steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
    dtypes = {x.dtype for x in jax.tree.leaves(steps.abstract_state["params"])}
    assert dtypes == {jnp.dtype(jnp.float32)}
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(steps.abstract_state["params"])}
    plain = Steps(tiny_config(tmp_path), build_mesh(cfg), make_optimizer(cfg))
    assert names == {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(plain.abstract_state["params"])
    }


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"quantization": "int4"}, "quantization"),
        ({"quantization": "int8", "lora_rank": 4}, "quantization=int8 .* lora_rank"),
        ({"quantization": "int8", "quantization_tile_size": -1}, "quantization_tile_size"),
    ],
)
def test_bad_quantization_settings_name_the_key(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, **changes)
