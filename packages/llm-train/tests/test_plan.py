"""The memory plan against the compiled step's memory_analysis() (one CPU device)."""

import pytest

from llm_core import load_config
from llm_train.cli import main
from llm_train.plan import compile_step, compiled_bytes, plan

BASE = [
    "num_layers=2",
    "emb_dim=256",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=64",
    "mlp_dim=512",
    "vocab_size=1024",
    "seq_len=128",
    "max_position_embeddings=256",
]


@pytest.mark.parametrize(
    "extra",
    [["remat_policy=none", "global_batch_size=8"], ["remat_policy=full", "global_batch_size=16"]],
)
def test_plan_within_15_percent_of_compiled(extra):
    cfg = load_config(None, [*BASE, *extra])
    estimate = plan(cfg)["total_bytes"]
    compiled, _ = compile_step(cfg)
    ratio = estimate / compiled_bytes(compiled)
    assert 0.85 < ratio < 1.15, ratio


def test_plan_and_compile_commands(capsys):
    assert main(["plan", "pretrain.yml", *BASE, "global_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "activations / device" in out and "train FLOPs / token" in out
    assert main(["compile", "pretrain.yml", *BASE, "global_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "compiled the train step" in out and "peak" in out


def test_compile_for_simulated_devices():
    """`--devices 4` simulates 4 CPU devices: the step compiles for an FSDP=4 mesh without running."""
    import subprocess
    import sys

    from conftest import subprocess_env

    cmd = [sys.executable, "-m", "llm_train.cli", "compile", "pretrain.yml", "--devices", "4"]
    cmd += [*BASE, "global_batch_size=4", "ici_fsdp_parallelism=4"]
    env = subprocess_env()
    env.pop("XLA_FLAGS")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "for 4 cpu devices" in proc.stdout


LAYOUTS = {
    "pp2_fsdp4": ["ici_stage_parallelism=2", "ici_fsdp_parallelism=4"],
    "pp2_dp4_remat": [
        "ici_stage_parallelism=2", "ici_data_parallelism=4", "ici_fsdp_parallelism=1",
        "remat_policy=full",
    ],
    "pp4_dp2": ["ici_stage_parallelism=4", "ici_data_parallelism=2", "ici_fsdp_parallelism=1"],
    "pp2_repeats2_dp2_tp2": [
        "ici_stage_parallelism=2", "num_pipeline_repeats=2", "num_pipeline_microbatches=4",
        "ici_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=1",
    ],
    "fsdp8": ["ici_fsdp_parallelism=8"],
    "tp2_fsdp4": ["ici_tensor_parallelism=2", "ici_fsdp_parallelism=4"],
    "sp2_tp2_fsdp2": [
        "ici_sequence_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2",
    ],
    "sp2_tp2_fsdp2_remat": [
        "ici_sequence_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2",
        "remat_policy=full",
    ],
    "cp2_fsdp4": ["ici_context_parallelism=2", "ici_fsdp_parallelism=4"],
    "cp2_ring_fsdp4": [
        "ici_context_parallelism=2", "context_parallel_strategy=ring", "ici_fsdp_parallelism=4",
    ],
}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plan_within_15_percent_of_compiled_on_8_devices(layout):
    """`compile --devices 8` prints the compiled peak beside the plan's estimate, for pipeline,
    FSDP, tensor, sequence and context parallelism; `plan` reports a pipeline's bubble."""
    import re
    import subprocess
    import sys

    from conftest import subprocess_env

    over = [*BASE, "num_layers=4", "global_batch_size=16", *LAYOUTS[layout]]
    env = subprocess_env()
    env.pop("XLA_FLAGS")
    run = [sys.executable, "-m", "llm_train.cli"]
    proc = subprocess.run(
        [*run, "compile", "pretrain.yml", "--devices", "8", *over],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak, estimate = map(
        float, re.search(r"peak\s+([\d.]+) GiB / device \(plan: ([\d.]+)", proc.stdout).groups()
    )
    assert 0.85 < estimate / peak < 1.15, (estimate, peak)
    if not layout.startswith("pp"):
        return
    proc = subprocess.run(
        [*run, "plan", "pretrain.yml", "--devices", "8", *over],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"pipeline\s+\d stages x \d repeats, \d microbatches, bubble", proc.stdout)
