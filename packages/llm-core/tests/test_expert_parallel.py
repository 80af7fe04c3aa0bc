"""Expert parallelism (llm_core.layers.expert_parallel) on 8 simulated CPU devices.

The whole model's loss and gradients under EP meshes (alone, with data, with FSDP and tensor)
equal one device; every `moe_matmul` handles the capacity-padded rows; a low capacity drops
exactly what the documented rule says; the compiled step really holds an all-to-all; and experts
split across two `jax.distributed` processes match one process.

The checks run in child Pythons (this file run as a script) so that they get their own simulated
devices; one child runs every 8-device check and reports each one's error (empty when it passed).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from multiprocess_testutil import run_workers

TINY_MOE = [
    "num_layers=2",
    "emb_dim=32",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=8",
    "mlp_dim=48",
    "vocab_size=64",
    "ffn_kind=moe",
    "num_experts=8",
    "num_experts_per_tok=2",
    "moe_mlp_dim=24",
]
SINGLE = ["ici_data_parallelism=1", "ici_fsdp_parallelism=1"]
LAYOUTS = {
    "ep8": ["ici_expert_parallelism=8"],
    "ep4_dp2": ["ici_expert_parallelism=4", "ici_data_parallelism=2"],
    "ep2_fsdp2_tp2": [
        "ici_expert_parallelism=2",
        "ici_fsdp_parallelism=2",
        "ici_tensor_parallelism=2",
    ],
    # capacity path through EP; factor 8 drops nothing on one device or under EP
    "ep8_capacity": ["ici_expert_parallelism=8", "moe_capacity_factor=8"],
    # quantized training: the local experts' products round their operands like one device's
    "ep4_dp2_int8": ["ici_expert_parallelism=4", "ici_data_parallelism=2", "quantization=int8"],
}
METHODS = ["grouped_matmul", "ragged_dot", "tiled", "dense"]
# layer checks: EP=4 x DP=2, so 2 local experts per shard and 8 token sources
LAYER_MESH = ["ici_expert_parallelism=4", "ici_data_parallelism=2"]
LOW_CAPACITY = 0.5  # 6 tokens x 2 choices per device, 4 shards: ceil(0.5 * 12 / 4) = 2 slots each
TOL = {"atol": 1e-5, "rtol": 1e-5}


# ---------------------------------------------------------------------------- child side
def _cfg(*extra):
    from llm_core import load_config

    return load_config(None, [*TINY_MOE, *SINGLE, *extra])


def _model_loss(graphdef):
    """Loss over logits and router aux losses (so router gradients are compared too)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss(state, ids, targets):
        logits, _, aux = nnx.merge(graphdef, state).forward(ids)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
        return nll + 0.01 * aux["moe_lb_loss"] + 1e-3 * aux["moe_z_loss"]

    return jax.value_and_grad(loss)


def _sharded(tree, mesh, cfg):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from llm_core import state_shardings

    batch = tuple(a for a in ("data", "fsdp", "fsdp_transpose", "expert") if mesh.shape[a] > 1)
    state, *batch_arrays = tree
    out = [jax.device_put(state, state_shardings(state, mesh, cfg))]
    out += [jax.device_put(a, NamedSharding(mesh, PartitionSpec(batch))) for a in batch_arrays]
    return out


def _close(got, want) -> str:
    """'' when every leaf matches within TOL, else the first mismatch."""
    import jax
    import numpy as np

    try:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, want)
    except AssertionError as err:
        return str(err)[:1500]
    return ""


def _model_checks(out: dict) -> None:
    import jax
    from flax import nnx

    from llm_core import build_model, create_mesh

    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    targets = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    want = {}  # one-device results by the settings that change the model (not the mesh)
    for name, extra in LAYOUTS.items():
        cfg = _cfg(*extra)
        graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
        step = _model_loss(graphdef)
        model_key = tuple(o for o in extra if not o.startswith(("ici_", "dcn_")))
        if model_key not in want:  # no context mesh: one device
            want[model_key] = jax.jit(step)(state, ids, targets)
        mesh = create_mesh(cfg)
        args = _sharded((state, ids, targets), mesh, cfg)
        with jax.set_mesh(mesh):
            compiled = jax.jit(step).lower(*args).compile()
            got = compiled(*args)
        out[f"layout:{name}"] = _close(got, want[model_key])
        hlo = compiled.as_text()
        out[f"hlo:{name}"] = "" if "all-to-all" in hlo else "no all-to-all in the compiled HLO"


def _layer_and_weights(cfg, x):
    import jax
    from flax import nnx

    from llm_core.layers.moe import MoE

    moe = MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moe)

    def f(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jax.numpy.sum(jax.numpy.sin(y)), (y, aux["moe_dropped"])

    return moe, state, jax.value_and_grad(f, has_aux=True)


def _layer_checks(out: dict) -> None:
    """MoE layer on LAYER_MESH: each moe_matmul equals one device (values, gradients); a low
    capacity drops what the documented rule drops."""
    import jax
    import numpy as np

    from llm_core import create_mesh

    x = jax.random.normal(jax.random.key(2), (8, 6, 32))  # 6 tokens per device
    for method in METHODS:
        cfg = _cfg(*LAYER_MESH, f"moe_matmul={method}")
        _, state, f = _layer_and_weights(cfg, x)
        want = jax.jit(f)(state, x)
        mesh = create_mesh(cfg)
        args = _sharded((state, x), mesh, cfg)
        with jax.set_mesh(mesh):
            got = jax.jit(f)(*args)
        out[f"method:{method}"] = _close(got, want)

    cfg = _cfg(*LAYER_MESH, f"moe_capacity_factor={LOW_CAPACITY}")
    moe, state, f = _layer_and_weights(cfg, x)
    mesh = create_mesh(cfg)
    args = _sharded((state, x), mesh, cfg)
    with jax.set_mesh(mesh):
        (_, (y, dropped)), _ = jax.jit(f)(*args)
    want_y, want_dropped = _drop_rule_reference(moe, np.asarray(x), sources=8, shards=4)
    out["capacity:output"] = _close(np.asarray(y), want_y.astype(np.float32))
    out["capacity:dropped"] = (
        "" if float(dropped) == want_dropped > 0 else f"dropped {float(dropped)} != {want_dropped}"
    )


def _drop_rule_reference(moe, x, sources: int, shards: int):
    """numpy per-assignment loop with the module docstring's rule: device s (of `sources`, in
    the order of the token axes) holds tokens [s * t, (s + 1) * t); the assignments it sends to
    one expert shard beyond ceil(c * t * k / shards) slots, in token order, are dropped."""
    import numpy as np

    from llm_core.layers.moe import route

    tokens = x.reshape(-1, x.shape[-1])
    weights, experts, _ = route(moe.router(tokens), moe.routing)
    weights, experts = np.asarray(weights, np.float64), np.asarray(experts)
    gate, up, down = (np.asarray(m.kernel[...], np.float64) for m in (moe.gate, moe.up, moe.down))
    t_local = len(tokens) // sources
    e_local = moe.num_experts // shards
    slots = math.ceil(LOW_CAPACITY * t_local * moe.routing.k / shards)
    used = np.zeros((sources, shards), int)
    out, dropped = np.zeros(tokens.shape, np.float64), 0
    for t, row in enumerate(np.asarray(tokens, np.float64)):
        for weight, e in zip(weights[t], experts[t], strict=True):
            dest = e // e_local
            used[t // t_local, dest] += 1
            if used[t // t_local, dest] > slots:
                dropped += 1
                continue
            h = row @ gate[e]
            out[t] += weight * ((h / (1 + np.exp(-h)) * (row @ up[e])) @ down[e])
    return out.reshape(x.shape), dropped


def _worker(process_id: int, port: int) -> None:
    """One of two processes x 2 CPU devices: the `expert` axis spans all 4 devices, so experts 0-3
    live in one process and 4-7 in the other; loss and gradients against this process's own
    one-device run. (On CPU, create_mesh treats the processes as one slice, so the axis is ici.)"""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from llm_core import build_model, create_mesh, state_shardings

    cfg = _cfg("ici_expert_parallelism=4")
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    targets = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    step = _model_loss(graphdef)
    want = jax.jit(step)(state, ids, targets)  # this process's first device alone
    mesh = create_mesh(cfg)
    assert jax.process_count() == 2 and dict(mesh.shape)["expert"] == 4, mesh
    owners = [d.process_index for d in mesh.devices.reshape(-1)]  # along the expert axis
    assert owners[:2] != owners[2:] and sorted(set(owners)) == [0, 1], owners

    from multiprocess_testutil import global_array as put

    batch = NamedSharding(mesh, PartitionSpec("expert"))
    args = (
        jax.tree.map(put, state, state_shardings(state, mesh, cfg)),
        put(ids, batch),
        put(targets, batch),
    )
    with jax.set_mesh(mesh):
        replicated = NamedSharding(mesh, PartitionSpec())
        compiled = jax.jit(step, out_shardings=replicated).lower(*args).compile()
        got = compiled(*args)
    has_a2a = "all-to-all" in compiled.as_text()
    print("RESULT", json.dumps({"error": _close(got, want), "all_to_all": has_a2a}))


# ---------------------------------------------------------------------------- test side
def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def eight_device_results() -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, __file__, "devices"],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ")[1])


@pytest.mark.cpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_model_loss_and_gradients_equal_one_device(eight_device_results, layout):
    assert eight_device_results[f"layout:{layout}"] == ""


@pytest.mark.cpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_step_has_all_to_all(eight_device_results, layout):
    """The EP path is really taken (no silent fall-back to XLA's own partitioning)."""
    assert eight_device_results[f"hlo:{layout}"] == ""


@pytest.mark.cpu
@pytest.mark.parametrize("method", METHODS)
def test_every_matmul_ignores_padding_rows(eight_device_results, method):
    assert eight_device_results[f"method:{method}"] == ""


@pytest.mark.cpu
def test_low_capacity_drops_by_the_documented_rule(eight_device_results):
    assert eight_device_results["capacity:dropped"] == ""
    assert eight_device_results["capacity:output"] == ""


@pytest.mark.multiprocess
def test_experts_split_across_two_processes_match_one_process():
    for res in run_workers(__file__, "worker"):
        assert res == {"error": "", "all_to_all": True}


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        results: dict[str, str] = {}
        _model_checks(results)
        _layer_checks(results)
        print("RESULT", json.dumps(results))
