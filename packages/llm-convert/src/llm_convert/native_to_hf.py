"""Write native parameters as a Hugging Face folder: config.json + (sharded) safetensors.

Every tensor's HF shape is worked out before any data is read (`jax.eval_shape` over the same
transforms), so shards are planned up front and written header first (`safetensors_stream`); large
2-D weights then stream through memory a slab of rows at a time (read from lazy TensorStore
handles when the checkpoint is a streamed one), the others one whole tensor at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_convert.families import FAMILIES
from llm_convert.hf_config import config_to_hf
from llm_convert.layout import Item, expected_tensors, get_path
from llm_convert.safetensors_stream import PlannedTensor, write_safetensors
from llm_convert.transforms import IDENTITY, LINEAR_IN, contiguous, transpose_into
from llm_core import Config

SLAB_BYTES = 64 << 20


def _slice(leaf, index: tuple):
    return leaf[index] if index else leaf


def _join(parts: list, entry, xp) -> object:
    """The HF tensor of a split entry from its parts (`xp`: numpy, or jax.numpy for shapes)."""
    if entry.interleaved:  # p0[0], p1[0], p0[1], p1[1], ... along the last axis
        return xp.stack(parts, axis=-1).reshape(*parts[0].shape[:-1], -1)
    return xp.concatenate(parts, axis=entry.split_axis)


def _native_shape(leaf, index: tuple) -> tuple[int, ...]:
    return tuple(leaf.shape[len(index) :])


def _whole(items: list[Item], params: dict, cast: np.dtype) -> Iterator[np.ndarray]:
    """The HF tensor of `items` (one item, or the parts of a split one) in one piece."""
    values = []
    for item in items:
        index = tuple(i for i in (item.stacked, item.expert) if i is not None)
        value = np.asarray(_slice(get_path(params, item.path), index)).astype(cast, copy=False)
        values.append(contiguous(item.entry.transform.to_hf(value)))
    entry = items[0].entry
    yield values[0] if entry.split is None else np.ascontiguousarray(_join(values, entry, np))


def _slabs(item: Item, params: dict, cast: np.dtype) -> Iterator[np.ndarray]:
    """A 2-D weight in HF row slabs: kernel [in, out] -> HF rows = kernel columns (transposed in
    blocks), or an embedding's rows as they are."""
    index = tuple(i for i in (item.stacked, item.expert) if i is not None)
    leaf = _slice(get_path(params, item.path), index)
    rows, cols = leaf.shape
    transposed = item.entry.transform is LINEAR_IN
    count, width = (cols, rows) if transposed else (rows, cols)
    step = max(1, SLAB_BYTES // (width * np.dtype(cast).itemsize))
    for start in range(0, count, step):
        stop = min(start + step, count)
        if transposed:
            block = np.asarray(leaf[:, start:stop]).astype(cast, copy=False)
            out = np.empty((stop - start, width), cast)
            transpose_into(out, block)
            yield out
        else:
            yield np.asarray(leaf[start:stop]).astype(cast, copy=False)


def plan_hf_tensors(params: dict, cfg: Config, cast: np.dtype) -> list[PlannedTensor]:
    """Every HF tensor in the family's first (export) layout, in order: fused tensors re-joined,
    per-expert tensors sliced out of the expert axis. Leaves may be numpy arrays or lazy
    TensorStore handles (only the needed slices are read, when the data is written)."""
    family = FAMILIES[cfg.model_family]
    groups: dict[str, list[Item]] = {}
    for item in expected_tensors(cfg, family, family.layouts[0]):
        groups.setdefault(item.name, []).append(item)
    planned, dtype = [], np.dtype(cast)
    for name, items in groups.items():
        items.sort(key=lambda item: item.entry.split[0] if item.entry.split else 0)
        entry = items[0].entry
        shapes = []
        for item in items:
            index = tuple(i for i in (item.stacked, item.expert) if i is not None)
            native = _native_shape(get_path(params, item.path), index)
            shapes.append(jax.ShapeDtypeStruct(native, jnp.float32))
        if entry.split is None:
            shape = jax.eval_shape(entry.transform.to_hf, shapes[0]).shape
        else:
            shape = jax.eval_shape(
                lambda *xs, entry=entry: _join([entry.transform.to_hf(x) for x in xs], entry, jnp),
                *shapes,
            ).shape
        streamable = (
            entry.split is None
            and len(shapes[0].shape) == 2
            and entry.transform in (LINEAR_IN, IDENTITY)
            and math.prod(shape) * dtype.itemsize > SLAB_BYTES
        )
        if streamable:
            produce = partial(_slabs, items[0], params, dtype)
        else:
            produce = partial(_whole, items, params, dtype)
        planned.append(PlannedTensor(name, tuple(shape), dtype, produce))
    return planned


def write_hf_folder(
    params: dict, cfg: Config, dst: Path, dtype: str, max_shard_bytes: int, cast=None
) -> list[str]:
    """Shards of at most `max_shard_bytes` (a larger tensor gets one of its own), planned up front
    and written header first, one slab at a time; an index file when there is more than one.
    `cast`: numpy dtype to write (default: the dtype named by `dtype`)."""
    from llm_convert.hf_to_native import NP_DTYPES

    hf_config = config_to_hf(cfg, dtype)  # first: it refuses configs the HF family cannot express
    cast = np.dtype(cast or NP_DTYPES[dtype])
    shards: list[list[PlannedTensor]] = [[]]
    for tensor in plan_hf_tensors(params, cfg, cast):
        size = sum(t.nbytes for t in shards[-1])
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(tensor)
    count = len(shards)
    names = (
        ["model.safetensors"]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        write_safetensors(dst / file, shard, {"format": "pt"})
        weight_map.update({tensor.name: file for tensor in shard})
    if count > 1:
        total = sum(t.nbytes for shard in shards for t in shard)
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
    return names
