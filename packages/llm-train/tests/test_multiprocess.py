"""2 processes x 2 CPU devices joined by jax.distributed: train, checkpoint, resume, same losses."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env, tiny_config, tiny_overrides

from llm_train.trainer import train

WORKER = """
import json, sys
import jax
from llm_core import load_config
from llm_train.trainer import train

overrides, max_steps = json.loads(sys.argv[1]), int(sys.argv[2])
cfg = load_config(None, overrides)
res = train(cfg, max_steps=max_steps or None)
assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
print("RESULT", json.dumps({"first": res.first_step, "losses": res.losses}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(overrides, max_steps):
    port = _free_port()
    procs = []
    for pid in range(2):
        over = [
            *overrides,
            f"coordinator_address=127.0.0.1:{port}",
            "num_processes=2",
            f"process_id={pid}",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(over), str(max_steps)],
                env=subprocess_env(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-4000:]
        outs.append(json.loads(out.split("RESULT ")[1]))
    return outs


@pytest.mark.multiprocess
def test_two_processes_resume_and_match_one_process(tmp_path):
    common = {"steps": 4, "warmup_steps": 0, "learning_rate": 3e-3, "checkpoint_every": 2}
    over = tiny_overrides(tmp_path, run_name="mp", **common)
    first = _run_pair(over, 2)  # steps 1-2, checkpoint at 2, stop
    second = _run_pair(over, 0)  # the same command: resumes at 2, runs 3-4
    assert [o["first"] for o in second] == [2, 2]
    got = {
        **{int(k): v for k, v in first[0]["losses"].items()},
        **{int(k): v for k, v in second[0]["losses"].items()},
    }
    assert first[0]["losses"] == first[1]["losses"]  # every process sees the same global loss
    single = train(tiny_config(tmp_path, run_name="one", **common))
    np.testing.assert_allclose(
        [got[s] for s in range(1, 5)], [single.losses[s] for s in range(1, 5)], rtol=1e-5
    )


@pytest.mark.multiprocess
def test_resume_on_another_process_count_matches_one_process(tmp_path, corpus, tokenizer_file):
    """Text data (packed, shuffled): 2 steps in 2 processes x 2 devices, then the same run resumed
    in this 1-process, 1-device pytest for steps 3-4, equals 4 steps in one process throughout: the
    data order is the global batch's, so the saved iterator state means the same on any count."""
    common = {
        "steps": 4, "warmup_steps": 0, "learning_rate": 3e-3, "checkpoint_every": 2,
        "dataset_kind": "text", "dataset_path": str(corpus / "*.py"),
        "tokenizer_path": str(tokenizer_file), "vocab_size": 512,
    }  # fmt: skip
    first = _run_pair(tiny_overrides(tmp_path, run_name="moved", **common), 2)
    resumed = train(tiny_config(tmp_path, run_name="moved", **common))
    assert resumed.first_step == 2
    got = {**{int(k): v for k, v in first[0]["losses"].items()}, **resumed.losses}
    single = train(tiny_config(tmp_path, run_name="one", **common))
    np.testing.assert_allclose(
        [got[s] for s in range(1, 5)], [single.losses[s] for s in range(1, 5)], rtol=1e-5
    )
