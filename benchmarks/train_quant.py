"""Training tokens/s with quantized training (`quantization: int8 | fp8 | fp8_full`, qwix) against
float32, on bench-small (seq 256, batch 4, AdamW, synthetic tokens) in one process.

The variants' steps are compiled first, then timed interleaved (one step of each per round, after
two warm-up rounds), median over the rounds. Prints the CPU model, the load average before and
after, the fp32 matmul ceiling measured here, and each variant's achieved FLOP/s against it.

    python benchmarks/train_quant.py [--rounds 5] [--modes none int8 fp8 fp8_full]

With `--quickstart-loss N` it instead trains the quick start's model on the quick start's data (the
Python standard library, its BPE tokenizer) for N steps per mode from the same seed and prints
each mode's loss curve summary against float32's (numerics, not speed).

    python benchmarks/train_quant.py --quickstart-loss 100
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from kernels import cpu_model, load_average
from train import matmul_ceiling

from llm_core import load_config
from llm_train.data.pipeline import synthetic_dataset
from llm_train.metrics import flops_per_token
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps


def quickstart_losses(steps: int, modes: list[str]) -> None:
    import os
    import sysconfig
    import tempfile

    from llm_train.data.tokenizer import train_bpe
    from llm_train.quickstart import MODEL, TRAIN, stdlib_files
    from llm_train.trainer import train

    out = tempfile.mkdtemp(prefix="qat-quickstart-")
    tok = os.path.join(out, "tokenizer.json")
    train_bpe(stdlib_files(), MODEL["vocab_size"], tok)
    curves = {}
    for mode in modes:
        values = {
            **MODEL, **TRAIN, "steps": steps, "quantization": mode, "run_name": mode,
            "dataset_path": os.path.join(sysconfig.get_paths()["stdlib"], "*.py"),
            "tokenizer_path": tok, "base_output_dir": out, "eval_fraction": 0.0,
            "console_progress": False, "checkpoint_every": 0,
        }  # fmt: skip
        result = train(load_config("pretrain.yml", [f"{k}={v}" for k, v in values.items()]))
        curves[mode] = [result.losses[k] for k in sorted(result.losses)]
    base = curves.get("none")
    print(f"quick start model and data, {steps} steps, same seed: mean loss of the last 10 steps")
    for mode, losses in curves.items():
        tail = float(np.mean(losses[-10:]))
        rel = f" ({tail / float(np.mean(base[-10:])) - 1:+.2%} vs float32)" if base else ""
        gap = (
            f", largest step gap {max(abs(a - b) for a, b in zip(losses, base)):.3f}"
            if base
            else ""
        )
        print(f"{mode:>9}: first {losses[0]:.3f}, last-10 mean {tail:.4f}{rel}{gap}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--modes", nargs="+", default=["none", "int8", "fp8", "fp8_full"])
    p.add_argument("--quickstart-loss", type=int, default=0, metavar="STEPS")
    args = p.parse_args()
    if args.quickstart_loss:
        quickstart_losses(args.quickstart_loss, args.modes)
        return
    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    ceiling = matmul_ceiling()
    runs = {}
    for mode in args.modes:
        cfg = load_config("bench-small", ["warmup_steps=0", f"quantization={mode}"])
        steps = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
        batch = {
            k: jax.device_put(v, steps.batch_sharding)
            for k, v in next(iter(synthetic_dataset(cfg, 0))).items()
        }
        runs[mode] = [cfg, steps, steps.init(), batch, []]
    for r in range(args.rounds + 2):
        for run in runs.values():
            _, steps, state, batch, times = run
            t = time.perf_counter()
            state, metrics = steps.train_step(state, batch)
            float(metrics["loss"])
            run[2] = state
            if r >= 2:
                times.append(time.perf_counter() - t)
    print(f"fp32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s")
    base = None
    for mode, (cfg, _, _, _, times) in runs.items():
        step = float(np.median(times))
        tps = cfg.global_batch_size * cfg.seq_len / step
        base = base or tps
        flops = tps * flops_per_token(cfg)
        print(
            f"{mode:>9}: {tps:8.1f} tokens/s ({tps / base:.2f}x float32), "
            f"{flops / 1e9:6.1f} GFLOP/s ({flops / ceiling:.0%} of the ceiling)"
        )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
