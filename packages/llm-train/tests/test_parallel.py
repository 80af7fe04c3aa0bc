"""Mesh layouts on 8 simulated CPU devices give the same losses as one device."""

import json
import subprocess
import sys

import numpy as np
from conftest import subprocess_env, tiny_config, tiny_overrides

from llm_train.trainer import train

LAYOUTS = {
    "dp8": ["ici_data_parallelism=8", "ici_fsdp_parallelism=1"],
    "fsdp8": ["ici_data_parallelism=1", "ici_fsdp_parallelism=8"],
    "dp2_fsdp2_tp2": [
        "ici_data_parallelism=2",
        "ici_fsdp_parallelism=2",
        "ici_tensor_parallelism=2",
    ],
    "cp8_all_gather": [
        "ici_data_parallelism=1",
        "ici_fsdp_parallelism=1",
        "ici_context_parallelism=8",
    ],
    "cp8_ring": [
        "ici_data_parallelism=1",
        "ici_fsdp_parallelism=1",
        "ici_context_parallelism=8",
        "context_parallel_strategy=ring",
    ],
    # device i holds sequence chunks i and 15 - i (2 tokens each); the ring skips hidden blocks
    "cp8_ring_balanced": [
        "ici_data_parallelism=1",
        "ici_fsdp_parallelism=1",
        "ici_context_parallelism=8",
        "context_parallel_strategy=ring",
        "context_parallel_load_balance=true",
    ],
    "cp2_fsdp2_tp2": [
        "ici_data_parallelism=1",
        "ici_context_parallelism=2",
        "ici_fsdp_parallelism=2",
        "ici_tensor_parallelism=2",
    ],
    # sequence parallelism: norms and residuals split over `sequence`, matmuls over tensor x sequence
    "sp2_tp2_fsdp2": [
        "ici_data_parallelism=1",
        "ici_sequence_parallelism=2",
        "ici_fsdp_parallelism=2",
        "ici_tensor_parallelism=2",
    ],
    # pipeline: one layer per stage, 2 microbatches of 4 rows (one on each data shard)
    "pp2_dp4": [
        "ici_stage_parallelism=2",
        "ici_data_parallelism=4",
        "ici_fsdp_parallelism=1",
    ],
    "pp2_fsdp2_tp2": [
        "ici_stage_parallelism=2",
        "ici_data_parallelism=1",
        "ici_fsdp_parallelism=2",
        "ici_tensor_parallelism=2",
    ],
}


def run_on_8_devices(script: str, *args) -> dict:
    """Run `script` in a child Python on 8 simulated CPU devices with JSON args; its RESULT."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *(json.dumps(a) for a in args)],
        env=subprocess_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ")[1])


CHILD = """
import json, sys
import jax
from llm_core import ConfigError, load_config
from llm_train.trainer import train

base, layouts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert jax.device_count() == 8, jax.devices()
out = {}
for name, extra in layouts.items():
    cfg = load_config(None, base + extra + [f"run_name={name}"])
    res = train(cfg)
    out[name] = [res.losses[s] for s in (1, 2, 3)]
# params of the FSDP run are really sharded: the embedding is split 8 ways
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
cfg = load_config(None, base + layouts["fsdp8"])
steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
import math
flat = jax.tree_util.tree_flatten_with_path(steps.abstract_with_sharding()["params"])[0]
sizes = [math.prod(x.sharding.shard_shape(x.shape)) / math.prod(x.shape) for path, x in flat if "norm" not in jax.tree_util.keystr(path)]
out["fsdp8_max_shard_fraction"] = max(sizes)
try:
    train(load_config(None, base + ["global_batch_size=4", "ici_data_parallelism=8", "ici_fsdp_parallelism=1", "run_name=bad"]))
    out["batch_error"] = ""
except ConfigError as err:
    out["batch_error"] = str(err)
try:
    train(load_config(None, base + layouts["pp2_dp4"] + ["num_pipeline_microbatches=4", "run_name=bad"]))
    out["pipeline_error"] = ""
except ConfigError as err:
    out["pipeline_error"] = str(err)
print("RESULT", json.dumps(out))
"""


def test_losses_agree_across_mesh_layouts(tmp_path):
    base = tiny_overrides(tmp_path, steps=3, warmup_steps=0, learning_rate=3e-3)
    out = run_on_8_devices(CHILD, base, LAYOUTS)
    single = train(
        tiny_config(tmp_path, steps=3, warmup_steps=0, learning_rate=3e-3, run_name="one")
    )
    want = [single.losses[s] for s in (1, 2, 3)]
    assert want[2] < want[0]
    for name in LAYOUTS:
        np.testing.assert_allclose(out[name], want, rtol=1e-5, err_msg=name)
    assert out["fsdp8_max_shard_fraction"] <= 1 / 8  # every weight matrix is split 8 ways
    assert "not divisible by the data-parallel size 8" in out["batch_error"]
    assert "do not split into num_pipeline_microbatches (4)" in out["pipeline_error"]


MOE = [
    "ffn_kind=moe",
    "num_experts=8",
    "num_experts_per_tok=2",
    "moe_mlp_dim=32",
]

EP_CHILD = """
import json, sys
import jax
from llm_core import load_config
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
from llm_train.trainer import train

cfg = load_config(None, json.loads(sys.argv[1]))
res = train(cfg)
steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
lowered = steps.train_step.lower(steps.abstract_with_sharding(), steps.abstract_batch())
hlo = lowered.compile(steps.compiler_options()).as_text()
print("RESULT", json.dumps({"losses": [res.losses[s] for s in (1, 2, 3)],
                            "all_to_all": "all-to-all" in hlo}))
"""


def test_moe_expert_parallel_losses_match_one_device(tmp_path):
    """Steps trace the model under the run's mesh, so MoE layers take the expert-parallel path
    (all-to-all in the compiled step) and train as on one device."""
    common = {"steps": 3, "warmup_steps": 0, "learning_rate": 3e-3}
    layout = ["ici_expert_parallelism=4", "ici_data_parallelism=2", "ici_fsdp_parallelism=1"]
    over = tiny_overrides(tmp_path, run_name="ep", **common) + MOE + layout
    out = run_on_8_devices(EP_CHILD, over)
    assert out["all_to_all"]
    from llm_core import load_config

    single = train(load_config(None, tiny_overrides(tmp_path, run_name="one", **common) + MOE))
    np.testing.assert_allclose(out["losses"], [single.losses[s] for s in (1, 2, 3)], rtol=1e-5)


RESHARD_CHILD = """
import json, sys
from llm_core import load_config
from llm_train.trainer import train

base, layouts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
new = layouts["pp2_fsdp2_tp2"]
straight = train(load_config(None, base + new + ["run_name=straight"]))
first = train(load_config(None, base + layouts["fsdp8"] + ["run_name=moved"]), max_steps=3)
resumed = train(load_config(None, base + new + ["run_name=moved"]))  # same run, another mesh
print("RESULT", json.dumps({
    "straight": [straight.losses[s] for s in range(1, 7)],
    "first": [first.losses[s] for s in range(1, 4)],
    "resumed_from": resumed.first_step,
    "resumed": [resumed.losses[s] for s in range(4, 7)],
}))
"""


def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
    """Saved under FSDP=8, resumed under PP=2 x FSDP=2 x TP=2: the same losses as a run that used
    the second mesh throughout (orbax reshards the arrays to the new mesh on restore, the stacked
    layers now split over the pipeline stages)."""
    base = tiny_overrides(tmp_path, steps=6, warmup_steps=0, learning_rate=3e-3, checkpoint_every=3)
    out = run_on_8_devices(RESHARD_CHILD, base, LAYOUTS)
    assert out["resumed_from"] == 3
    np.testing.assert_allclose(out["first"], out["straight"][:3], rtol=1e-5)
    np.testing.assert_allclose(out["resumed"], out["straight"][3:], rtol=1e-5)
    assert out["straight"][5] < out["straight"][0]
