"""Serving with quantized weights and KV cache: bench-small decoding 128 tokens after a 32-token
prompt at batch 1 and 8, llm-serve's engine, float32 weights vs bfloat16 vs int8 and grouped int4
weights (`llm-convert quantize`, group 128) vs an int8 KV cache (`kv_cache_dtype: int8`).

Batch-1 decode reads every weight once per step, so its speed follows the weight bytes; the script
prints tokens/s and the achieved GFLOP/s against the fp32 matmul ceiling measured in the same run
(median of --repeats rounds, the variants interleaved within each round), the
weight bytes read per decode step, the weights' serving memory and checkpoint size on disk
(`llm_core.save`), and the KV cache bytes per token, with the CPU model and the load average before
and after.

    python benchmarks/serve_quant.py [--batches 1 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np
from flax import nnx
from kernels import cpu_model, load_average
from serve import ours
from train import matmul_ceiling

from llm_core import build_model, load_config
from llm_core.io import abstract_model, model_from_params
from llm_core.layers.quantize import quantize_params


def variants(cfg):
    """name -> (cfg, model) for the same random weights."""
    base = build_model(cfg, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    bf16_cfg = cfg.replace(dtype="bfloat16", weight_dtype="bfloat16")
    bf16 = model_from_params(bf16_cfg, jax.tree.map(lambda a: a.astype("bfloat16"), params))
    q_cfg = cfg.replace(weight_quantization="int8")
    int8 = model_from_params(q_cfg, quantize_params(params, abstract_model(q_cfg)))
    q4_cfg = cfg.replace(weight_quantization="int4", weight_quantization_group_size=128)
    int4 = model_from_params(q4_cfg, quantize_params(params, abstract_model(q4_cfg), 128))
    kv_cfg = cfg.replace(kv_cache_dtype="int8")
    kv = nnx.merge(nnx.graphdef(abstract_model(kv_cfg)), nnx.state(base))
    return {
        "float32": (cfg, base),
        "bfloat16 weights": (bf16_cfg, bf16),
        "int8 weights": (q_cfg, int8),
        "int4 weights": (q4_cfg, int4),
        "int8 KV cache": (kv_cfg, kv),
    }


def weight_bytes(model, cfg) -> int:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    embed = cfg.vocab_size * cfg.emb_dim * leaves[0].dtype.itemsize  # gathered, not read whole
    return sum(x.nbytes for x in leaves) - embed


def memory_and_checkpoint_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter in memory, bytes of the saved native checkpoint)."""
    import tempfile
    from pathlib import Path

    from llm_core import save

    in_memory = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save(model, Path(tmp) / "ckpt")
        on_disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return in_memory, on_disk


def cache_bytes_per_token(model) -> float:
    cache = model.init_cache(1, 64)
    return sum(x.nbytes for x in jax.tree.leaves(cache)) / 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    ceiling = matmul_ceiling()
    print(f"matmul ceiling (fp32 2048^3, jax, this run): {ceiling / 1e9:,.1f} GFLOP/s")
    new, prompt_len = 128, 32
    cfg = load_config("bench-small.yml", ["kv_cache_max_length=160", "max_prefill_length=64"])
    models = variants(cfg)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, prompt_len)).astype(np.int32)
    for name, (c, m) in models.items():
        memory, disk = memory_and_checkpoint_bytes(m)
        print(f"{name:<17} weights read per step {weight_bytes(m, c) / 1e6:7.1f} MB, "
              f"in memory {memory / 1e6:7.1f} MB, checkpoint {disk / 1e6:7.1f} MB, "
              f"KV cache {cache_bytes_per_token(m) / 1e3:6.1f} kB/token")  # fmt: skip
    # useful work: 2 FLOPs per matmul weight per token (prompt and generated), embedding excluded
    matmul_weights = sum(
        x.size for x in jax.tree.leaves(nnx.state(models["float32"][1], nnx.Param))
    )
    matmul_weights -= cfg.vocab_size * cfg.emb_dim * (1 if not cfg.tie_embeddings else 0)
    for batch in args.batches:
        runs = {name: ours(c, m, batch, prompts, new) for name, (c, m) in models.items()}
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(run()[1])
        base = statistics.median(times["float32"])
        for name, ts in times.items():
            t = statistics.median(ts)
            flops = 2 * matmul_weights * batch * (prompt_len + new) / t
            print(
                f"batch {batch} {name:<17} {batch * new / t:8.1f} tok/s  {base / t:5.2f}x float32"
                f"  {flops / 1e9:6.1f} GFLOP/s ({100 * flops / ceiling:4.1f}% of the ceiling)"
            )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
