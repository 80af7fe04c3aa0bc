"""MoE training throughput of llm-train on the CPU against transformers' MixtralForCausalLM + torch AdamW.

Model (both sides): vocab 32000, d_model 512, 8 layers, 8 heads, 4 kv heads, head_dim 64, 8 experts
top-2 of width 1408, seq 256, batch 4, float32, AdamW, random tokens. Ours runs dropless (the
default `moe_matmul: tiled`) and, as a second line, with `moe_capacity_factor: 1.25` (tokens beyond
an expert's capacity are dropped; transformers never drops); torch runs transformers' eager expert loop
with N threads.

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
    ours, capped, theirs = [], [], []
    for r in range(args.rounds):
        ours.append(child(JAX_CHILD, str(args.steps), threads=args.threads))
        theirs.append(child(TORCH_CHILD, str(args.steps), str(args.threads), threads=args.threads))
        capped.append(
            child(JAX_CHILD, str(args.steps), "moe_capacity_factor=1.25", threads=args.threads)
        )
        print(
            f"round {r + 1}: llm-train dropless {ours[-1]['step_s']:.3f}s/step, "
            f"capacity 1.25 {capped[-1]['step_s']:.3f}s/step, torch {theirs[-1]['step_s']:.3f}s/step",
            flush=True,
        )
    peak = matmul_ceiling()
    tokens = BATCH * SEQ
    flops_tok = ours[0]["flops_per_token"]
    ours_s = statistics.median(o["step_s"] for o in ours)
    theirs_s = statistics.median(t["step_s"] for t in theirs)
    capped_s = statistics.median(c["step_s"] for c in capped)
    for name, step in (
        ("llm-train dropless (moe_matmul tiled)", ours_s),
        ("llm-train moe_capacity_factor 1.25", capped_s),
        ("torch Mixtral eager", theirs_s),
    ):
        achieved = tokens * flops_tok / step
        print(
            f"{name}: {tokens / step:,.0f} tokens/s, {achieved / 1e9:,.1f} GFLOP/s = "
            f"{100 * achieved / peak:.1f}% of the matmul ceiling"
        )
    print(f"matmul ceiling (fp32 2048^3, jax, this run): {peak / 1e9:,.1f} GFLOP/s")
    print(f"ratio llm-train dropless / torch: {theirs_s / ours_s:.2f}x (target >= 1.5x)")
    print(f"ratio llm-train capacity 1.25 / torch: {theirs_s / capped_s:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    result = {
        "ours_step_s": ours_s,
        "capacity_step_s": capped_s,
        "torch_step_s": theirs_s,
        "ratio": theirs_s / ours_s,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
