"""Pipeline parallelism (llm_core.models.pipeline) on 8 simulated CPU devices: the model's loss and
gradients under PP=4 x DP=2, PP=2 x FSDP=2 x TP=2, PP=2 with circular repeats and a MoE model (also
with PP=2 x EP=2 x DP=2), and PP with context parallelism (ring and all_gather), equal one device; the compiled step passes activations with collective-permutes and each stage holds only
its own layers; stages in two `jax.distributed` processes match one process; the bubble formula;
config errors before any compile."""

import json
import sys

import pytest
from multiprocess_testutil import run_workers
from test_sharding import _run_on_8_devices

from llm_core import ConfigError, bubble_fraction, load_config

TINY = [
    "num_layers=4", "emb_dim=32", "num_heads=4", "num_kv_heads=2", "head_dim=8", "mlp_dim=48",
    "vocab_size=64", "global_batch_size=8", "seq_len=16",
]  # fmt: skip
MOE = ["ffn_kind=moe", "num_experts=4", "num_experts_per_tok=2", "moe_mlp_dim=24"]
LAYOUTS = {
    "pp4_dp2": ["ici_stage_parallelism=4", "ici_data_parallelism=2", "ici_fsdp_parallelism=1"],
    "pp2_fsdp2_tp2": [
        "ici_stage_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2",
        "ici_data_parallelism=1",
    ],
    # circular: stage s holds layers s and s + 2; 4 microbatches of 2 rows (one per data shard)
    "pp2_repeats2_dp2_tp2": [
        "ici_stage_parallelism=2", "num_pipeline_repeats=2", "num_pipeline_microbatches=4",
        "ici_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=1",
    ],
    "moe_pp2_dp4": [
        *MOE, "ici_stage_parallelism=2", "ici_data_parallelism=4", "ici_fsdp_parallelism=1",
    ],  # 2 microbatches of 4 rows
    # the sequence split over `context` inside each stage (the ring's shard_map nests too)
    "pp2_cp2_ring_dp2": [
        "ici_stage_parallelism=2", "ici_context_parallelism=2", "context_parallel_strategy=ring",
        "ici_data_parallelism=2", "ici_fsdp_parallelism=1",
    ],
    "pp2_cp4_all_gather": [
        "ici_stage_parallelism=2", "ici_context_parallelism=4", "ici_data_parallelism=1",
        "ici_fsdp_parallelism=1",
    ],
    # aux-loss-free routing: every layer's tokens per expert, per group, through the pipeline
    "moe_bias_pp2_dp4": [
        *MOE, "router_kind=sigmoid_topk", "router_bias_update_rate=0.001",
        "ici_stage_parallelism=2", "ici_data_parallelism=4", "ici_fsdp_parallelism=1",
    ],
    # experts split over `expert` inside each stage (a shard_map within the pipeline's)
    "moe_pp2_ep2_dp2": [
        *MOE, "ici_stage_parallelism=2", "ici_expert_parallelism=2", "ici_data_parallelism=2",
        "ici_fsdp_parallelism=1",
    ],
}  # fmt: skip

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from llm_core import build_model, create_mesh, load_config, state_shardings

tiny, layouts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
single = ["ici_data_parallelism=1", "ici_fsdp_parallelism=1"]
ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
targets = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)


def loss_and_grads(graphdef):
    def loss(state, ids, targets):
        logits, _, aux = nnx.merge(graphdef, state).forward(ids)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
        counts = aux.get("router_load", aux.get("moe_tokens_per_expert", jnp.zeros(())))
        return nll, counts
    return jax.value_and_grad(loss, has_aux=True)


out = {}
for name, extra in layouts.items():
    model_keys = [o for o in extra if not o.startswith(("ici_", "num_pipeline"))]
    graphdef, state = nnx.split(build_model(load_config(None, tiny + single + model_keys), rngs=nnx.Rngs(0)))
    (want, want_counts), want_g = jax.jit(loss_and_grads(graphdef))(state, ids, targets)
    cfg = load_config(None, tiny + extra)
    mesh = create_mesh(cfg)
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    state = jax.device_put(state, state_shardings(state, mesh, cfg))
    rows = NamedSharding(mesh, P(tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)))
    batch = [jax.device_put(a, rows) for a in (ids, targets)]  # rows split as in training
    with jax.set_mesh(mesh):
        step = jax.jit(loss_and_grads(graphdef))
        (got, counts), got_g = step(state, *batch)
        hlo = step.lower(state, *batch).compile().as_text()
    errs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got_g, want_g))
    kernel = state["groups"]["layer_0"]["attn"]["q"]["kernel"][...]
    out[name] = {
        "loss": [float(got), float(want)],
        "grad_err": max(errs),
        "counts_err": max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), counts, want_counts))),
        "permutes": hlo.count("collective-permute"),
        "all_to_all": "all-to-all" in hlo,
        "layers_per_device": kernel.sharding.shard_shape(kernel.shape)[0],
        "layers": kernel.shape[0],
        "stages": mesh.shape["stage"],
    }
print("RESULT", json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    out = _run_on_8_devices_with_args(SCRIPT, TINY, LAYOUTS)
    return out


def _run_on_8_devices_with_args(script: str, *args) -> dict:
    quoted = ", ".join(repr(json.dumps(a)) for a in args)
    stdout = _run_on_8_devices(f"import sys; sys.argv = ['-', {quoted}]\n" + script)
    return json.loads(stdout.split("RESULT ")[1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_and_gradients_equal_one_device(results, layout):
    r = results[layout]
    got, want = r["loss"]
    assert abs(got - want) <= 1e-5 * abs(want), r
    assert r["grad_err"] < 1e-5, r
    assert r["counts_err"] == 0, r  # MoE: the same tokens reach the same experts


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_activations_move_between_stages_and_each_holds_its_layers(results, layout):
    r = results[layout]
    assert r["permutes"] > 0, r
    assert r["layers_per_device"] == r["layers"] // r["stages"], r
    if "_ep" in layout:  # expert parallelism inside the stages dispatches with all-to-all
        assert r["all_to_all"], r


def test_bubble_fraction():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 1) == 0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["ici_stage_parallelism=2", "num_pipeline_microbatches=3"], "multiple of the stage"),
        (["ici_stage_parallelism=2", "num_pipeline_microbatches=16"], "global_batch_size"),
        (["ici_stage_parallelism=4", "num_pipeline_repeats=2"], "cannot be cut into"),
        (["num_layers=3", "ici_stage_parallelism=2"], "num_layers \\(3\\)"),
        (["num_pipeline_repeats=2"], "only apply with pipeline"),
        (["ici_stage_parallelism=2", "num_pipeline_repeats=0"], "num_pipeline_repeats"),
    ],
)
def test_bad_pipeline_settings_name_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + extra)


def _worker(process_id: int, port: int) -> None:
    """One of two processes x 2 CPU devices: the mesh orders devices by process and `stage` comes
    before `fsdp`, so stage 0 lives in one process and stage 1 in the other (FSDP=2 within each;
    on CPU, create_mesh treats the processes as one slice, so the axis is ici); loss and gradients
    against this process's own one-device run."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from llm_core import build_model, create_mesh, state_shardings

    single = load_config(None, [*TINY, "ici_data_parallelism=1", "ici_fsdp_parallelism=1"])
    cfg = load_config(None, [*TINY, "ici_stage_parallelism=2", "ici_data_parallelism=1"])
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    targets = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)

    def loss_and_grads(graphdef):
        def loss(state, ids, targets):
            logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(ids))
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

        return jax.value_and_grad(loss)

    graphdef, state = nnx.split(build_model(single, rngs=nnx.Rngs(0)))
    want = jax.jit(loss_and_grads(graphdef))(state, ids, targets)  # this process alone
    mesh = create_mesh(cfg)
    stages = np.moveaxis(mesh.devices, list(mesh.axis_names).index("stage"), 0).reshape(2, -1)
    owners = [sorted({d.process_index for d in row}) for row in stages]
    assert dict(mesh.shape)["stage"] == 2 and owners in ([[0], [1]], [[1], [0]]), owners

    from multiprocess_testutil import global_array as put

    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    args = (
        jax.tree.map(put, state, state_shardings(state, mesh, cfg)),
        put(ids, rows),
        put(targets, rows),
    )
    with jax.set_mesh(mesh):
        replicated = NamedSharding(mesh, PartitionSpec())
        compiled = (
            jax.jit(loss_and_grads(graphdef), out_shardings=replicated).lower(*args).compile()
        )
        got = compiled(*args)
    errs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, want))
    print(
        "RESULT",
        json.dumps({"err": max(errs), "permutes": "collective-permute" in compiled.as_text()}),
    )


@pytest.mark.multiprocess
def test_stages_in_two_processes_match_one_process():
    for res in run_workers(__file__):
        assert res["err"] < 1e-5 and res["permutes"], res


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
