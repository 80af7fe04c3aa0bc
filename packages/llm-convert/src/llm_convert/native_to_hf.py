"""Write native parameters as a Hugging Face folder: config.json + (sharded) safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llm_convert.families import FAMILIES
from llm_convert.hf_config import config_to_hf
from llm_convert.layout import expected_tensors, get_path
from llm_core import Config


def hf_tensors(params: dict, cfg: Config, dtype=None):
    """Yield (hf name, numpy array) one tensor at a time in the family's first (export) layout;
    fused tensors are re-joined, per-expert tensors sliced out of the expert axis. Leaves may be
    lazy (TensorStore handles of a streamed checkpoint): only the needed slice is read. `dtype`:
    cast each tensor to it."""
    family = FAMILIES[cfg.model_family]
    pending: dict[str, list] = {}
    for name, entry, path, stacked, expert in expected_tensors(cfg, family, family.layouts[0]):
        leaf = get_path(params, path)
        index = tuple(i for i in (stacked, expert) if i is not None)
        value = np.asarray(leaf[index] if index else leaf)
        if dtype is not None:
            value = value.astype(dtype)
        value = entry.transform.to_hf(value)
        if entry.split is None:
            yield name, np.ascontiguousarray(value)
            continue
        part, parts = entry.split
        pending.setdefault(name, [None] * parts)[part] = value
        if all(p is not None for p in pending[name]):
            parts_ = pending.pop(name)
            if entry.interleaved:  # p0[0], p1[0], p0[1], p1[1], ... along the last axis
                joined = np.stack(parts_, axis=-1).reshape(*parts_[0].shape[:-1], -1)
            else:
                joined = np.concatenate(parts_, axis=entry.split_axis)
            yield name, np.ascontiguousarray(joined)


def write_hf_folder(
    params: dict, cfg: Config, dst: Path, dtype: str, max_shard_bytes: int, cast=None
) -> list[str]:
    """Shards of at most `max_shard_bytes`, each written as soon as it is full (memory: one shard);
    an index file when there is more than one. `cast`: numpy dtype to cast each tensor to."""
    hf_config = config_to_hf(cfg, dtype)  # first: it refuses configs the HF family cannot express
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)

    def flush() -> None:
        file = f"shard-{len(written):05d}.tmp"
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        written.append((file, list(shard), sum(t.nbytes for t in shard.values())))
        shard.clear()

    for name, tensor in hf_tensors(params, cfg, cast):
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
    flush()
    count = len(written)
    names = (
        ["model.safetensors"]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    weight_map = {}
    for final, (file, tensor_names, _) in zip(names, written):
        os.replace(dst / file, dst / final)
        weight_map.update({name: final for name in tensor_names})
    if count > 1:
        total = sum(size for _, _, size in written)
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
    return names
