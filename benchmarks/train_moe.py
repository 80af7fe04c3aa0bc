"""MoE training throughput of llm-train on the CPU against transformers' MixtralForCausalLM + torch AdamW.

Model (both sides): vocab 32000, d_model 512, 8 layers, 8 heads, 4 kv heads, head_dim 64, 8 experts
top-2 of width 1408, seq 256, batch 4, float32, AdamW, random tokens. Ours runs dropless with the
default `moe_matmul: auto` (the llm-kernels grouped matmul on CPU), with `moe_matmul: tiled` and
`ragged_dot`, and with `moe_capacity_factor: 1.25` (tokens beyond an expert's capacity are dropped;
transformers never drops); torch runs transformers' eager expert loop with N threads.

Each side runs in its own child process; the sides alternate for --rounds rounds and each figure is
the median over rounds (each round: the median step of --steps timed steps after 2 warm-up steps).
Prints tokens/s, achieved FLOP/s against the fp32 matmul ceiling measured in the same run, the CPU
model and the load average before and after.

    python benchmarks/train_moe.py [--steps 5] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

from train import matmul_ceiling  # benchmarks/train.py: the same ceiling, one definition

AUTO, TORCH = "llm-train dropless (moe_matmul auto)", "torch Mixtral eager"
SHAPE = dict(vocab=32000, d=512, layers=8, heads=8, kv=4, hd=64, experts=8, k=2, width=1408)
BATCH, SEQ = 4, 256

JAX_CHILD = r"""
import json, sys, time
import jax, numpy as np
from llm_core import load_config
from llm_train.metrics import flops_per_token
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
steps, extra = int(sys.argv[1]), sys.argv[2:]
cfg = load_config("bench-small", [f"steps={steps + 2}", "warmup_steps=0", "ffn_kind=moe",
    "num_experts=8", "num_experts_per_tok=2", "moe_mlp_dim=1408", "moe_aux_loss_weight=0.02", *extra])
s = Steps(cfg, build_mesh(cfg), make_optimizer(cfg))
state = s.init()
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (4, 257)).astype(np.int32)
pos = np.broadcast_to(np.arange(256, dtype=np.int32), (4, 256))
batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": pos,
         "segment_ids": np.ones((4, 256), np.int32), "weights": np.ones((4, 256), np.float32)}
batch = {k: jax.device_put(v, s.batch_sharding) for k, v in batch.items()}
times = []
for _ in range(steps + 2):
    t = time.perf_counter()
    state, m = s.train_step(state, batch)
    float(m["loss"])
    times.append(time.perf_counter() - t)
print("RESULT", json.dumps({"step_s": float(np.median(times[2:])), "flops_per_token": flops_per_token(cfg),
                            "loss": float(m["loss"])}))
"""

TORCH_CHILD = r"""
import json, sys, time
import torch
from transformers import MixtralConfig, MixtralForCausalLM
steps, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.02,
                    attn_implementation="sdpa")
model = MixtralForCausalLM(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
ids = torch.randint(0, 32000, (4, 257))
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    out = model(input_ids=ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
step = sorted(times[2:])[len(times[2:]) // 2]
print("RESULT", json.dumps({"step_s": step, "loss": float(out.loss)}))
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def child(code: str, *args: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=3600
    )
    if proc.returncode:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ")[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (after 2 warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the baseline")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; load average before: {os.getloadavg()}")
    variants = {
        "llm-train dropless (moe_matmul auto)": [],
        "llm-train dropless (moe_matmul tiled)": ["moe_matmul=tiled"],
        "llm-train dropless (moe_matmul ragged_dot)": ["moe_matmul=ragged_dot"],
        "llm-train moe_capacity_factor 1.25": ["moe_capacity_factor=1.25"],
    }
    runs: dict[str, list[dict]] = {name: [] for name in [*variants, TORCH]}
    for r in range(args.rounds):
        for name, extra in variants.items():
            runs[name].append(child(JAX_CHILD, str(args.steps), *extra, threads=args.threads))
        runs[TORCH].append(
            child(TORCH_CHILD, str(args.steps), str(args.threads), threads=args.threads)
        )
        summary = ", ".join(f"{n} {v[-1]['step_s']:.3f}s" for n, v in runs.items())
        print(f"round {r + 1}: {summary}", flush=True)
    peak = matmul_ceiling()
    tokens = BATCH * SEQ
    flops_tok = runs[AUTO][0]["flops_per_token"]
    step_s = {name: statistics.median(o["step_s"] for o in v) for name, v in runs.items()}
    for name, step in step_s.items():
        achieved = tokens * flops_tok / step
        print(
            f"{name}: {tokens / step:,.0f} tokens/s, {step:.3f} s/step, {achieved / 1e9:,.1f} "
            f"GFLOP/s = {100 * achieved / peak:.1f}% of the matmul ceiling"
        )
    print(f"matmul ceiling (fp32 2048^3, jax, this run): {peak / 1e9:,.1f} GFLOP/s")
    for name in variants:
        print(f"ratio {name} / torch: {step_s[TORCH] / step_s[name]:.2f}x")
    ragged = step_s["llm-train dropless (moe_matmul ragged_dot)"]
    print(f"ratio moe_matmul auto / ragged_dot: {ragged / step_s[AUTO]:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    print("RESULT " + json.dumps({"step_s": step_s, "ratio": step_s[TORCH] / step_s[AUTO]}))


if __name__ == "__main__":
    main()
