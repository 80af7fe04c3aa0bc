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
