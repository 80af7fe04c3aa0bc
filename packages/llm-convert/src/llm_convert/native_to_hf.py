"""Write native parameters as a Hugging Face folder: config.json + (sharded) safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llm_convert.families import FAMILIES
from llm_convert.hf_config import config_to_hf
from llm_convert.layout import expected_tensors, get_path
from llm_core import Config


def hf_tensors(params: dict, cfg: Config):
    """Yield (hf name, numpy array) one tensor at a time in the family's first (export) layout;
    fused tensors are re-joined, per-expert tensors sliced out of the expert axis."""
    family = FAMILIES[cfg.model_family]
    pending: dict[str, list] = {}
    for name, entry, path, stacked, expert in expected_tensors(cfg, family, family.layouts[0]):
        value = np.asarray(get_path(params, path))
        for i in (stacked, expert):
            value = value[i] if i is not None else value
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
    params: dict, cfg: Config, dst: Path, dtype: str, max_shard_bytes: int
) -> list[str]:
    """Shards of at most `max_shard_bytes`; an index file when there is more than one."""
    hf_config = config_to_hf(cfg, dtype)  # first: it refuses configs the HF family cannot express
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, tensor in hf_tensors(params, cfg):
        if sizes[-1] and sizes[-1] + tensor.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    if len(shards) > 1:
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2)
        )
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
    return names
