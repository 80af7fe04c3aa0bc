"""Stream a Hugging Face checkpoint into native parameters, one tensor at a time.

Safetensors files are memory-mapped; each tensor is read, transformed and copied into its place in a
preallocated native array, so peak memory is the native parameters plus one tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from llm_convert.errors import ConversionError
from llm_convert.families import Family
from llm_convert.layout import get_path, has_path, layer_location
from llm_convert.transforms import LINEAR_IN, LINEAR_OUT_HEADS
from llm_core import Config
from llm_core.io import abstract_model

SUPPORTED_DTYPES = {"F32", "BF16", "F16"}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def tensor_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or the files themselves."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ConversionError(f"{index} is not a valid safetensors index: {err}") from None
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"No *.safetensors files in {folder}.")
    out: dict[str, Path] = {}
    for file in files:
        with _open(file) as f:
            out.update({name: file for name in f.keys()})  # noqa: SIM118
    return out


def _open(file: Path):
    if not file.exists():
        raise ConversionError(f"{file} is listed in the index but does not exist.")
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise ConversionError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None


def expected_tensors(
    cfg: Config, family: Family
) -> list[tuple[str, object, tuple[str, ...], int | None]]:
    """(hf name, entry, native path, stacked index) for every tensor the model needs."""
    out = []
    for entry in family.globals:
        if entry.native == ("lm_head",) and cfg.tie_embeddings:
            continue
        if entry.native == ("embedder", "positions") and cfg.position_embedding != "learned":
            continue
        out.append((entry.hf, entry, entry.native, None))
    for i in range(cfg.num_layers):
        prefix, index = layer_location(cfg, i)
        for entry in family.layer:
            out.append((entry.hf.format(i=i), entry, prefix + entry.native, index))
    return out


def convert_hf_params(folder: Path, cfg: Config, family: Family, dtype: str = "float32") -> dict:
    """Read every tensor of the HF checkpoint in `folder` into a native nested dict of numpy arrays."""
    np_dtype = NP_DTYPES[dtype]
    _, state = nnx.split(abstract_model(cfg))
    shapes = nnx.to_pure_dict(state)
    params = jax.tree.map(lambda a: np.empty(a.shape, np_dtype), shapes)
    seen: set[tuple[tuple[str, ...], int | None]] = set()
    index = tensor_index(folder)
    expected = expected_tensors(cfg, family)
    needed = {name for name, *_ in expected}
    missing = sorted(needed - set(index))
    if missing:
        raise ConversionError(
            f"{folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"needed by the {family.name} config in config.json."
        )
    extra = sorted(
        n
        for n in set(index) - needed
        if not n.endswith(family.ignore_suffixes)
        and not (n == "lm_head.weight" and cfg.tie_embeddings)
    )
    if extra:
        raise ConversionError(
            f"{folder}: unexpected tensor(s) {extra[:5]} not used by the {family.name} model."
        )

    # File by file, closing each when done: memory-mapped pages of finished files leave RSS.
    expected.sort(key=lambda item: str(index[item[0]]))
    handle, current = None, None
    for name, entry, path, stacked in expected:
        file = index[name]
        if file != current:
            handle, current = _open(file), file
        with_dtype = handle.get_slice(name).get_dtype()
        if with_dtype not in SUPPORTED_DTYPES:
            raise ConversionError(
                f"{file}: tensor '{name}' has dtype {with_dtype}; supported: F32, BF16, F16."
            )
        tensor = handle.get_tensor(name)
        if tensor.dtype == np_dtype and tensor.dtype.itemsize == 2:
            tensor = tensor.view(np.uint16)  # bf16/f16 layout moves at memcpy speed as raw bits
        if entry.split is not None:
            part, parts = entry.split
            size = tensor.shape[-1] // parts
            tensor = tensor[..., part * size : (part + 1) * size]
        if not has_path(params, path):
            raise ConversionError(f"{file}: tensor '{name}' has no native place {'.'.join(path)}.")
        target = get_path(params, path)
        shape = target.shape[1:] if stacked is not None else target.shape
        if tensor.dtype == np.uint16:
            target = target.view(np.uint16)
        slot = target[stacked] if stacked is not None else target
        if not _place(slot, tensor, entry.transform, shape):
            raise ConversionError(
                f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, which does not fit the native "
                f"shape {tuple(shape)} implied by config.json."
            )
        del tensor
        seen.add((path, stacked))
    not_filled = [
        ".".join(p)
        for p, leaf in _flat(params)
        if not all((p, i) in seen for i in (range(leaf.shape[0]) if p[0] == "groups" else [None]))
    ]
    if not_filled:
        raise ConversionError(f"{folder}: native parameters {not_filled[:5]} received no tensor.")
    return params


def _place(slot: np.ndarray, tensor: np.ndarray, transform, shape) -> bool:
    """Write `transform.to_native(tensor)` into `slot` (a contiguous view); False if shapes do not fit.

    2-D transposes are copied in blocks of rows: a plain strided transpose of a large matrix thrashes
    the cache and runs ~9x slower."""
    if tensor.ndim == 2 and transform in (LINEAR_IN, LINEAR_OUT_HEADS):
        rows, cols = tensor.shape  # native 2-D view: [cols, rows]
        fits = (shape[0] == cols) if transform is LINEAR_IN else (shape[-1] == rows)
        if not fits or math.prod(shape) != tensor.size:
            return False
        flat = slot.reshape(cols, rows)
        for start in range(0, rows, 16):
            flat[:, start : start + 16] = tensor[start : start + 16].T
        return True
    try:
        slot[...] = transform.to_native(tensor, shape)  # casts in place: no extra copy
    except ValueError:
        return False
    return True


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, (*prefix, key))
    else:
        yield prefix, tree
