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
