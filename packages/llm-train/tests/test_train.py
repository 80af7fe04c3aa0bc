import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import subprocess_env, tiny_config, tiny_overrides

from llm_train.checkpoint import Checkpointer
from llm_train.trainer import TrainingDiverged, train


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_outputs_and_exact_resume(tmp_path, corpus, tokenizer_file):
    """10 steps straight == 5 steps, stop, resume 5 steps (text data: packing state included)."""
    data = {
        "dataset_kind": "text",
        "dataset_path": str(corpus / "*.py"),
        "tokenizer_path": str(tokenizer_file),
        "vocab_size": 512,
        "steps": 10,
        "checkpoint_every": 5,
        "tensorboard": True,
        "eval_every": 5,
        "eval_fraction": 0.2,
        "eval_batches": 1,
    }
    straight = train(tiny_config(tmp_path, run_name="straight", **data))
    assert sorted(straight.losses) == list(range(1, 11))
    assert straight.losses[10] < straight.losses[1]

    cfg = tiny_config(tmp_path, run_name="resumed", **data)
    first = train(cfg, max_steps=5)
    assert first.last_step == 5
    second = train(cfg)  # the same command again: resumes from step 5
    assert second.first_step == 5 and second.last_step == 10
    for step in range(6, 11):
        np.testing.assert_allclose(second.losses[step], straight.losses[step], rtol=1e-6)
    np.testing.assert_allclose(second.eval_losses[10], straight.eval_losses[10], rtol=1e-6)

    out = straight.out_dir
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert any("eval_perplexity" in r for r in read_metrics(out))
    assert os.listdir(os.path.join(out, "tensorboard"))
    assert os.path.exists(os.path.join(out, "config.yml"))
    ck = Checkpointer(os.path.join(out, "checkpoints"))
    assert ck.all_steps() == [5, 10]
    ck.close()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(
        tmp_path,
        optimizer="sgd",
        learning_rate=1e30,
        warmup_steps=0,
        lr_schedule="constant",
        grad_clip=0,
        checkpoint_every=1,
        steps=20,
    )
    with pytest.raises(TrainingDiverged, match=r"at step (\d+).*Last good checkpoint: step") as err:
        train(cfg)
    bad = int(err.value.args[0].split("at step ")[1].split(":")[0])
    ck = Checkpointer(os.path.join(cfg.base_output_dir, cfg.run_name, "checkpoints"))
    assert ck.latest_step() == bad - 1
    ck.close()


def _cli(tmp_path, *extra):
    return [
        sys.executable,
        "-m",
        "llm_train.cli",
        "train",
        "pretrain.yml",
        *tiny_overrides(tmp_path, *extra),
    ]


def test_sigterm_saves_and_next_run_resumes(tmp_path):
    args = [sys.executable, "-m", "llm_train.cli", "train", "pretrain.yml"]
    over = tiny_overrides(tmp_path, steps=100000, log_every=1, run_name="sig")
    proc = subprocess.Popen([*args, *over], env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Signal received: saved step" in err
    assert "Compiled the train step in" in err.split("step 1/")[0]  # not inside step 1's time
    saved = int(err.split("saved step ")[1].split(";")[0])
    ck = Checkpointer(str(tmp_path / "runs" / "sig" / "checkpoints"))
    assert ck.latest_step() == saved
    ck.close()
    over = tiny_overrides(tmp_path, steps=saved + 2, run_name="sig")
    done = subprocess.run(
        [*args, *over], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Resumed from" in done.stderr and f"step {saved}." in done.stderr
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "sig")]
    assert steps[-2:] == [saved + 1, saved + 2]


KILL_MID_SAVE = """
import os, signal, sys
from llm_core import load_config
from llm_train import checkpoint, trainer

orig = checkpoint.Checkpointer.save
def save(self, step, *a, **k):
    out = orig(self, step, *a, **k)
    if step == 3:  # the async write of step 3 is under way: die now
        os.kill(os.getpid(), signal.SIGKILL)
    return out
checkpoint.Checkpointer.save = save
trainer.train(load_config(None, sys.argv[1:]))
"""


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path):
    over = tiny_overrides(
        tmp_path, steps=6, checkpoint_every=1, async_checkpointing=True, run_name="k"
    )
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, *over],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ck = Checkpointer(str(tmp_path / "runs" / "k" / "checkpoints"))
    assert ck.latest_step() == 2  # step 3 never finalised; step 2 intact
    ck.close()
    result = train(tiny_config(tmp_path, steps=6, checkpoint_every=1, run_name="k"))
    assert result.first_step == 2 and result.last_step == 6


def test_compilation_cache_is_written_and_reused(tmp_path):
    """`compilation_cache_dir: auto` puts JAX's persistent cache beside the runs; a second run (a
    new process) reads it and trains to the same losses."""
    cache = tmp_path / "runs" / ".jax_cache"
    losses = []
    for name in ("first", "second"):
        over = tiny_overrides(tmp_path, steps=2, run_name=name, compilation_cache_dir="auto")
        out = subprocess.run(
            [sys.executable, "-m", "llm_train.cli", "train", "pretrain.yml", *over],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        if name == "first":
            entries = sorted(p.name for p in cache.iterdir())
            assert any("train_step" in e for e in entries), entries
        losses.append([m["loss"] for m in read_metrics(tmp_path / "runs" / name)])
    assert losses[0] == losses[1]


def test_multi_token_prediction_is_logged_in_metrics(tmp_path):
    result = train(tiny_config(tmp_path, run_name="mtp", steps=3, mtp_num_layers=1))
    rows = [r for r in read_metrics(result.out_dir) if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["mtp_loss"]) for r in rows)


def test_tensorboard_writer_does_not_import_torch():
    """tensorboardX imports torch whenever it is installed (2.5 s of start-up); the writer hides it
    for that import and restores it, so torch still imports afterwards."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing to hide")
    code = (
        "import sys\n"
        "from llm_train.metrics import _import_summary_writer\n"
        "_import_summary_writer()\n"
        "assert 'torch' not in sys.modules, sys.modules.get('torch')\n"
        "import torch\n"
        "print('ok', torch.ones(1).item())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and "ok 1.0" in out.stdout, out.stderr[-2000:]
