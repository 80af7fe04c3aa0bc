import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import subprocess_env, tiny_overrides

import llm_core
from llm_train.cli import main


@pytest.mark.parametrize("command", ["train", "export", "plan", "compile"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as err:
        main([command, "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "llm-train train" in out


def test_train_then_export_loads_in_llm_core(tmp_path, capsys):
    over = tiny_overrides(tmp_path, steps=3, run_name="cli")
    prof = ["profile_start_step=2", "profile_end_step=3"]
    assert main(["train", "pretrain.yml", *over, *prof]) == 0
    assert "done: steps 0->3" in capsys.readouterr().out
    traces = list((tmp_path / "runs" / "cli" / "profile").rglob("*.xplane.pb"))
    assert traces, "the profiler wrote no trace for steps 2..3"
    out = tmp_path / "exported"
    assert main(["export", "pretrain.yml", *over, "--out", str(out)]) == 0
    model = llm_core.load(out)
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, 256) and np.isfinite(np.asarray(logits)).all()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    over = tiny_overrides(tmp_path, dataset_kind="text", dataset_path=str(tmp_path / "none*.txt"))
    over.append(f"tokenizer_path={tmp_path}")
    assert main(["train", "pretrain.yml", *over]) == 2
    assert "error:" in capsys.readouterr().err
    assert (
        main(["export", "pretrain.yml", *tiny_overrides(tmp_path, run_name="x"), "--out", "o"]) == 2
    )
    assert "train first" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    """`python -m llm_train.cli` is what the `llm-train` script runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "llm_train.cli", "--help"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "plan" in proc.stdout
