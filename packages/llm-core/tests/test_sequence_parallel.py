"""Sequence parallelism (llm_core.layers.sequence_parallel) on 8 simulated CPU devices: loss and
gradients under SP=2 x TP=2 x FSDP=2, with context parallelism (all_gather and ring), with pipeline
stages and with MoE layers (also expert-parallel) equal one device; the compiled step's layer loops
carry the residual stream split over `sequence` and gather each block's input; config errors name
the key before any compile."""

import pytest
from test_pipeline import MOE, TINY, _run_on_8_devices_with_args

from llm_core import ConfigError, load_config

ONE = ["ici_data_parallelism=1", "ici_fsdp_parallelism=1"]
LAYOUTS = {
    "sp2_tp2_fsdp2": [
        "ici_sequence_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2",
        "ici_data_parallelism=1",
    ],
    "sp4_fsdp2": ["ici_sequence_parallelism=4", "ici_fsdp_parallelism=2", "ici_data_parallelism=1"],
    # device (c, s) holds chunk c * 2 + s: gathering over `sequence` leaves context chunk c
    "sp2_cp2_tp2": [
        *ONE, "ici_sequence_parallelism=2", "ici_context_parallelism=2",
        "ici_tensor_parallelism=2",
    ],
    "sp2_cp2_ring_dp2": [
        "ici_sequence_parallelism=2", "ici_context_parallelism=2", "context_parallel_strategy=ring",
        "ici_data_parallelism=2", "ici_fsdp_parallelism=1",
    ],
    "pp2_sp2_tp2": [
        *ONE, "ici_stage_parallelism=2", "ici_sequence_parallelism=2", "ici_tensor_parallelism=2",
    ],
    "moe_sp2_tp2_dp2": [
        *MOE, "ici_sequence_parallelism=2", "ici_tensor_parallelism=2", "ici_data_parallelism=2",
        "ici_fsdp_parallelism=1",
    ],
    "moe_sp2_ep2_dp2": [
        *MOE, "ici_sequence_parallelism=2", "ici_expert_parallelism=2", "ici_data_parallelism=2",
        "ici_fsdp_parallelism=1",
    ],
    # the same remat policies the trainer offers, with the gathered input left out of each
    "sp2_tp2_fsdp2_save_dots": [
        "ici_sequence_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2",
        "ici_data_parallelism=1", "remat_policy=save_dots",
    ],
}  # fmt: skip

SCRIPT = r"""
import json, re, sys
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from llm_core import build_model, create_mesh, length_axes, load_config, state_shardings

tiny, one, layouts = (json.loads(a) for a in sys.argv[1:4])
ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
targets = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)


def loss_and_grads(graphdef):
    def loss(state, ids, targets):
        logits, _, _ = nnx.merge(graphdef, state).forward(ids)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    return jax.value_and_grad(loss)


out = {}
for name, extra in layouts.items():
    model_keys = [o for o in extra if not o.startswith(("ici_", "num_pipeline"))]
    graphdef, state = nnx.split(build_model(load_config(None, tiny + one + model_keys), rngs=nnx.Rngs(0)))
    want, want_g = jax.jit(loss_and_grads(graphdef))(state, ids, targets)
    cfg = load_config(None, tiny + extra)
    mesh = create_mesh(cfg)
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    state = jax.device_put(state, state_shardings(state, mesh, cfg))
    rows = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1) or None
    batch = [jax.device_put(a, NamedSharding(mesh, P(rows, length_axes(dict(mesh.shape))))) for a in (ids, targets)]
    with jax.set_mesh(mesh):
        step = jax.jit(loss_and_grads(graphdef))
        got, got_g = step(state, *batch)
        hlo = step.lower(state, *batch).compile().as_text()
    errs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got_g, want_g))
    carries = [m.group(1) for m in re.finditer(r"= \((.*?)\) while\(", hlo)]
    out[name] = {
        "loss": [float(got), float(want)],
        "grad_err": max(errs),
        "carries": carries,
        "gathers": re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(.*?dimensions=\{1\}", hlo),
    }
print("RESULT", json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    return _run_on_8_devices_with_args(SCRIPT, TINY, ONE, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_and_gradients_equal_one_device(results, layout):
    r = results[layout]
    got, want = r["loss"]
    assert abs(got - want) <= 1e-5 * abs(want), r["loss"]
    assert r["grad_err"] < 1e-5, r["grad_err"]


def test_layer_loops_carry_the_residual_split_and_gather_block_inputs(results):
    """SP=2 x TP=2 x FSDP=2, batch 8 over FSDP, 16 tokens, width 32: the forward and backward
    layer loops carry [4, 8, 32] residuals (and saved per-layer stacks [layers, 4, 8, 32]), never
    a whole sequence [.., 16, 32] of the residual width; each block gathers its input to
    [4, 16, 32] (all-gather over `sequence` on the length axis)."""
    r = results["sp2_tp2_fsdp2"]
    carries = [c for c in r["carries"] if "f32[4,8,32]" in c]
    assert len(carries) >= 2, r["carries"]  # the forward and the backward scan over layers
    for carry in carries:
        assert not [s for s in carry.split(", ") if s.endswith(",16,32]")], carry
    assert "4,16,32" in r["gathers"], r["gathers"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["ici_sequence_parallelism=2", "seq_len=15"],
            "seq_len \\(15\\).*ici_sequence_parallelism x dcn_",
        ),
        (
            ["ici_sequence_parallelism=4", "ici_context_parallelism=2", "seq_len=12"],
            "x the context parallelism",
        ),
        (["ici_sequence_parallelism=8"], "must divide num_heads \\(4\\)"),
    ],
)
def test_bad_sequence_settings_name_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + extra)
