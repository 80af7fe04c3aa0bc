"""MaxText's training throughput on the bench model (CPU, float32, synthetic data): the baseline
`benchmarks/train.py --maxtext-python PYTHON` runs in a venv with MaxText (benchmarks/maxtext_venv.sh).

Drives MaxText's real pre-training entry point, `maxtext.trainers.pre_train.train.main` (its
packaged base.yml + the overrides below), for 2 warm-up steps + N timed steps. The only hook wraps
`train.training_loop_iteration` (one call per step) to block on the new state and take a time stamp.

Model: configs/bench-small.yml's shapes (vocab 32000, emb 512, 8 layers, 8 q / 4 kv heads, head_dim
64, SwiGLU 1408, RMSNorm eps 1e-5, rope theta 10000, untied embeddings), float32 weights and
activations, AdamW, dot_product attention, batch 4 x 256 on one CPU device. No remat, as llm-train:
scan_layers=false + remat_policy=none, and keep_remat_none() below works around MaxText 0.2.5 turning
"none" into None (which means full remat on the unscanned path). Compilation cache off.

Prints `RESULT {"tokens_per_sec", "step_s" (median seconds between finished steps after the
warm-up), "first_step_s" (process start to the first finished step), "steps"}`.

    JAX_PLATFORMS=cpu PYTHON benchmarks/maxtext_train.py [timed_steps=8]
"""

import json
import os
import statistics
import sys
import tempfile
import time

import psutil

PROC_START = psutil.Process().create_time()  # wall clock, seconds since epoch
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# MaxText's own switch that stubs out GCS, JetStream and goodput
os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# MaxText prints to stdout: keep stdout for the RESULT line
STDOUT, sys.stdout = sys.stdout, sys.stderr

import jax  # noqa: E402
from maxtext.trainers.pre_train import train  # noqa: E402
from maxtext_model import BENCH_SMALL  # noqa: E402

WARMUP, BATCH, SEQ = 2, 4, 256


def maxtext_argv(steps, out_dir):
    """argv for MaxText's train.main: packaged base.yml + key=value overrides."""
    base_yml = os.path.join(os.path.dirname(train.pyconfig.__file__), "base.yml")
    overrides = dict(
        **BENCH_SMALL,
        run_name="bench",
        base_output_directory=out_dir,
        remat_policy="none",
        # data / optimizer
        dataset_type="synthetic",
        per_device_batch_size=BATCH,
        max_target_length=SEQ,
        opt_type="adamw",
        steps=steps,
        gcs_metrics=False,
        save_config_to_gcs=False,
        enable_goodput_recording=False,
        monitor_goodput=False,
    )
    return ["train.py", base_yml] + [f"{k}={v}" for k, v in overrides.items()]


def keep_remat_none(initialize):
    """Workaround for MaxText 0.2.5: pyconfig turns the string "none" into None, but the
    unscanned decoder only skips jax.checkpoint when remat_policy == "none" (None means
    jax.checkpoint(policy=None), i.e. full remat). Put the string back after validation."""

    def wrapped(*args, **kwargs):
        cfg = initialize(*args, **kwargs)
        if cfg.remat_policy is None:
            object.__getattribute__(cfg, "_pydantic_config").remat_policy = "none"
            cfg.get_keys()["remat_policy"] = "none"
        return cfg

    return wrapped


def main():
    timed = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    argv = maxtext_argv(WARMUP + timed, tempfile.mkdtemp(prefix="maxtext_train_"))

    stamps, stamps_wall = [], []  # perf_counter / wall clock after each finished step
    inner = train.training_loop_iteration

    def timed_iteration(jax_device_state, python_vars, immutable_data):
        metrics = inner(jax_device_state, python_vars, immutable_data)
        jax.block_until_ready((jax_device_state["state"], metrics))
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            stamps_wall.append(time.time())
        return metrics

    train.training_loop_iteration = timed_iteration
    train.pyconfig.initialize = keep_remat_none(train.pyconfig.initialize)
    train.main(argv)

    deltas = [b - a for a, b in zip(stamps[WARMUP - 1 :], stamps[WARMUP:])]
    step_s = statistics.median(deltas)
    print(
        "RESULT "
        + json.dumps(
            {
                "tokens_per_sec": BATCH * SEQ / step_s,
                "step_s": step_s,
                "first_step_s": stamps_wall[0] - PROC_START,
                "steps": len(deltas),
            }
        ),
        file=STDOUT,
        flush=True,
    )


if __name__ == "__main__":
    main()
