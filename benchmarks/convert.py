"""Convert a random llama3.2-1b-shaped bf16 HF checkpoint: our hf-to-native vs transformers' load.

Each side runs in its own subprocess so peak RSS is its own. Prints seconds, MB/s and peak RSS.
Target (issue): peak RSS < checkpoint/2 + 1 GB, and faster than transformers' from_pretrained.

    python benchmarks/convert.py [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import resource, sys, time
start = time.perf_counter()
if sys.argv[1] == "ours":
    from llm_convert import hf_to_native
    hf_to_native(sys.argv[2], sys.argv[3], dtype="bfloat16")
else:
    import torch, transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) > 0
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_random_checkpoint(folder: Path, layers: int) -> int:
    """llama3.2-1b shapes, bf16, written tensor by tensor (no torch model needed)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from llm_convert.families import FAMILIES
    from llm_convert.hf_config import config_to_hf
    from llm_convert.hf_to_native import expected_tensors
    from llm_core import load_config

    cfg = load_config("llama3.2-1b", [f"num_layers={layers}"])
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = {
        "q_proj": (cfg.num_heads * 64, cfg.emb_dim),
        "k_proj": (cfg.resolved_num_kv_heads * 64, cfg.emb_dim),
        "v_proj": (cfg.resolved_num_kv_heads * 64, cfg.emb_dim),
        "o_proj": (cfg.emb_dim, cfg.num_heads * 64),
        "gate_proj": (cfg.mlp_dim, cfg.emb_dim),
        "up_proj": (cfg.mlp_dim, cfg.emb_dim),
        "down_proj": (cfg.emb_dim, cfg.mlp_dim),
        "embed_tokens": (cfg.vocab_size, cfg.emb_dim),
    }
    total, shard, files, weight_map = 0, {}, [], {}

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)
        shard.clear()

    for name, *_ in expected_tensors(cfg, FAMILIES["llama"]):
        key = next((k for k in shapes if k in name), None)
        shape = shapes[key] if key else (cfg.emb_dim,)
        shard[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        total += shard[name].nbytes
        if sum(t.nbytes for t in shard.values()) > 1 << 30:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, "bfloat16")))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=16, help="16 = the real llama3.2-1b (1.24B params)"
    )
    parser.add_argument("--keep", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="convert-bench-"))
    src = work / "hf"
    t0 = time.perf_counter()
    size = write_random_checkpoint(src, args.layers)
    mb = size / 2**20
    print(
        f"checkpoint: {mb:,.0f} MB bf16 ({size // 2:,} params), written in {time.perf_counter() - t0:.1f}s"
    )
    rows = {}
    for side in ("ours", "transformers"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, side, str(src), str(work / "native")],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(f"{side} failed")
        seconds, rss = map(float, out.stdout.split()[-2:])
        rows[side] = (seconds, rss)
        print(f"{side:>12}: {seconds:6.1f} s  {mb / seconds:7.0f} MB/s  peak RSS {rss:,.0f} MB")
    ours, theirs = rows["ours"], rows["transformers"]
    target = mb / 2 + 1024
    print(f"speed ratio (transformers time / ours): {theirs[0] / ours[0]:.2f}x")
    print(
        f"peak RSS ours {ours[1]:,.0f} MB vs target {target:,.0f} MB (checkpoint/2 + 1 GB): "
        f"{'met' if ours[1] < target else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
