"""Conversion in bounded memory: our hf-to-native (and native-to-hf) vs transformers' from_pretrained.

Random bf16 checkpoints, written tensor by tensor with the names and shapes of transformers' own
model (built on the meta device): llama3.2-1b-shaped (2.5 GB) and DeepSeek-V3-shaped with one
(dense) layer at full width (4.9 GB: the 129k x 7168 embedding and head dominate); and the latter
with its decoder Linear weights in DeepSeek's FP8 format (float8 e4m3, 128 x 128 block scales),
which only ours converts (dequantized while streaming; the export writes bf16). Every side runs
in its own subprocess (peak RSS is its own), interleaved, three rounds, after an `os.sync()`; the
table shows medians.
An I/O benchmark: MB/s of checkpoint read, not FLOP/s. transformers 5 may leave weights memory-mapped
(not read) after from_pretrained: it is timed as is and with every weight page touched.

Target (issue): peak RSS under 1 GB + the largest tensor, and throughput at least transformers'.

    python benchmarks/convert.py [--rounds 3] [--keep DIR] [--only llama|deepseek|deepseek-fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import sys, time
start = time.perf_counter()
side, src, dst = sys.argv[1:4]
if side == "ours":
    from llm_convert import hf_to_native
    hf_to_native(src, dst, dtype="bfloat16")
elif side == "export":
    from llm_convert import native_to_hf
    native_to_hf(src, dst, max_shard_bytes=1 << 30)
else:
    import torch, transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) > 0
    if side == "transformers-paged-in":  # the weights may still be memory-mapped: touch every page
        for p in m.parameters():
            float(p.data.reshape(-1)[::2048].float().sum())
# VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over exec)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(time.perf_counter() - start, int(hwm) / 1024)
"""

SHAPES = {
    "llama": ("llama3.2-1b", []),
    "deepseek": ("deepseek-v3", ["num_layers=1", "first_num_dense_layers=1"]),
    # DeepSeek-V3's own format: the decoder's Linear weights float8 e4m3 with 128 x 128 block
    # scales (weight_scale_inv); transformers cannot load it on the CPU, so only ours runs
    "deepseek-fp8": ("deepseek-v3", ["num_layers=1", "first_num_dense_layers=1"]),
}


def fp8_blocks(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float32 -> (float8 e4m3, float32 weight_scale_inv per 128 x 128 block)."""
    import ml_dtypes

    out, inp = value.shape
    rows, cols = -(-out // 128), -(-inp // 128)
    padded = np.zeros((rows * 128, cols * 128), np.float32)
    padded[:out, :inp] = value
    blocks = padded.reshape(rows, 128, cols, 128)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(rows * 128, cols * 128)[:out, :inp]
    return q.astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


def write_random_checkpoint(folder: Path, model: str) -> tuple[int, int]:
    """bf16 safetensors in 1 GB shards + config.json -> (bytes, largest tensor's bytes)."""
    import ml_dtypes
    import torch
    import transformers
    from safetensors.numpy import save_file

    from llm_convert.hf_config import config_to_hf
    from llm_core import load_config

    name, overrides = SHAPES[model]
    hf_dict = config_to_hf(load_config(name, overrides), "bfloat16")
    config_cls = transformers.AutoConfig.for_model(hf_dict["model_type"]).__class__
    keep = {k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        shapes = {
            n: tuple(p.shape)
            for n, p in transformers.AutoModelForCausalLM.from_config(config_cls(**keep))
            .state_dict()
            .items()
        }
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total, largest, shard, weight_map = 0, 0, {}, {}

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard.clear()

    for tensor_name, shape in shapes.items():
        value = rng.standard_normal(shape, np.float32) * (0.02 if len(shape) > 1 else 1.0)
        quantize = (
            model.endswith("fp8") and len(shape) == 2 and tensor_name.startswith("model.layers.")
            and tensor_name.endswith("proj.weight")
        )  # fmt: skip
        if quantize:
            shard[tensor_name], shard[tensor_name + "_scale_inv"] = fp8_blocks(value)
        else:
            shard[tensor_name] = value.astype(ml_dtypes.bfloat16)
        nbytes = shard[tensor_name].nbytes
        total, largest = total + nbytes, max(largest, nbytes)
        if sum(t.nbytes for t in shard.values()) > 1 << 30:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(hf_dict))
    return total, largest


def run(side: str, src: Path, dst: Path) -> tuple[float, float]:
    os.sync()  # flush the previous side's written data first: no side pays for another's writeback
    out = subprocess.run(
        [sys.executable, "-c", CHILD, side, str(src), str(dst)], capture_output=True, text=True
    )
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit(f"{side} failed")
    seconds, rss = map(float, out.stdout.split()[-2:])
    return seconds, rss


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--only", choices=sorted(SHAPES), default=None)
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="convert-bench-"))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    for model in [args.only] if args.only else list(SHAPES):
        src = work / f"{model}-hf"
        size, largest = write_random_checkpoint(src, model)
        mb, largest_mb = size / 2**20, largest / 2**20
        print(f"\n{model}: {mb:,.0f} MB checkpoint on disk, largest tensor {largest_mb:,.0f} MB")
        fp8 = model.endswith("fp8")
        sides = ("ours", "export") if fp8 else ("ours", "export", "hf", "hf+")
        results: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        for _ in range(args.rounds):  # interleaved
            results["ours"].append(run("ours", src, work / f"{model}-native"))
            if not fp8:
                results["hf"].append(run("transformers", src, work))
            results["export"].append(
                run("export", work / f"{model}-native", work / f"{model}-back")
            )
            if not fp8:
                results["hf+"].append(run("transformers-paged-in", src, work))
        for side, label in (
            ("ours", "hf-to-native"), ("export", "native-to-hf"), ("hf", "from_pretrained"),
            ("hf+", "+ paged in"),
        ):  # fmt: skip
            if side not in results:
                continue
            secs = statistics.median(s for s, _ in results[side])
            rss = statistics.median(r for _, r in results[side])
            print(f"  {label:>16}: {secs:6.1f} s  {mb / secs:7.0f} MB/s  peak RSS {rss:7,.0f} MB")
        ours = results["ours"]
        for side, label in (("hf", "lazy from_pretrained"), ("hf+", "from_pretrained, paged in")):
            if side not in results:
                continue
            ratio = statistics.median(s for s, _ in results[side]) / statistics.median(
                s for s, _ in ours
            )
            print(f"  hf-to-native throughput vs {label}: {ratio:.2f}x")
        peak = max(r for _, r in ours + results["export"])
        target = 1024 + largest_mb
        print(
            f"  peak RSS (worst of ours) {peak:,.0f} MB vs target {target:,.0f} MB "
            f"(1 GB + largest tensor): {'met' if peak < target else 'NOT met'}"
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
