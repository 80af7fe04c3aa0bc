"""Stream a Hugging Face checkpoint into native parameters, one tensor at a time.

Safetensors files are memory-mapped; each tensor is read, transformed and copied into its place in a
preallocated native array (per-expert tensors into their index of the stacked expert axis), so peak
memory is the native parameters plus one tensor.
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
from llm_convert.layout import detect_layout, get_path, has_path, stacked_segments
from llm_convert.quantized import quantized_tensors, read_quantized
from llm_convert.raw_reader import RawReader
from llm_convert.transforms import EXPERTS_LINEAR, IDENTITY, LINEAR_IN, LINEAR_OUT_HEADS
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


def convert_hf_params(
    folder: Path, cfg: Config, family: Family, dtype: str = "float32", writer=None
) -> dict | None:
    """Read every tensor of the HF checkpoint in `folder` into a native nested dict of numpy arrays,
    or, with `writer` (`llm_core.streamed.StreamingWriter`), straight into its on-disk arrays one
    slice at a time (returns None): then memory holds one tensor, never the model."""
    np_dtype = NP_DTYPES[dtype]
    _, state = nnx.split(abstract_model(cfg))
    shapes = nnx.to_pure_dict(state)
    params = None if writer else jax.tree.map(lambda a: np.empty(a.shape, np_dtype), shapes)
    seen: dict[tuple[str, ...], set[tuple[int | None, int | None]]] = {}
    index = tensor_index(folder)
    quantized = quantized_tensors(index)  # logical name -> how to dequantize it
    index.update({name: index[parts[1]] for name, parts in quantized.items()})
    for name, (_, *parts) in quantized.items():
        for part in parts:  # blocks and scales are read as their logical tensor, not on their own
            if part != name:
                index.pop(part, None)
    _, expected = detect_layout(cfg, family, set(index))
    needed = {item.name for item in expected}
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
    if family.mtp_layers_after_decoder:
        extra = _skip_mtp_layers(extra, cfg.num_layers + cfg.mtp_num_layers)
    if extra:
        raise ConversionError(
            f"{folder}: unexpected tensor(s) {extra[:5]} not used by the {family.name} model."
        )

    # File by file (each validated by the safetensors library once), tensors read with plain
    # file reads (raw_reader.py): memory holds what was read, not the mapped shard.
    expected.sort(key=lambda item: str(index[item.name]))
    current, source_index, reader = None, tensor_index(folder), RawReader()
    for name, entry, path, stacked, expert in expected:
        file = index[name]
        if not has_path(shapes, path):
            raise ConversionError(f"{file}: tensor '{name}' has no native place {'.'.join(path)}.")
        at = tuple(i for i in (stacked, expert) if i is not None)  # layer group, expert
        seen.setdefault(path, set()).add((stacked, expert))
        if name in quantized:  # MXFP4 / FP8 blocks: dequantized to float32 here
            tensor = read_quantized(quantized[name], source_index, _open)
        else:
            if file != current:  # validate each file once with the safetensors library
                with _open(file):
                    current = file
            with_dtype, hf_shape = reader.info(file, name)
            if with_dtype not in SUPPORTED_DTYPES:
                raise ConversionError(
                    f"{file}: tensor '{name}' has dtype {with_dtype}; supported: F32, BF16, F16, "
                    "and MXFP4 (_blocks + _scales) or FP8 with weight_scale_inv."
                )
            if writer is not None and _stream_in_slabs(
                reader, file, name, hf_shape, entry, writer, path, at, np_dtype
            ):
                continue
            tensor = reader.rows(file, name)
        if tensor.dtype == np_dtype and tensor.dtype.itemsize == 2:
            tensor = tensor.view(np.uint16)  # bf16/f16 layout moves at memcpy speed as raw bits
        if writer is None:
            slot = get_path(params, path)
            for i in at:
                slot = slot[i]  # a contiguous view of one layer / one expert
        else:  # a buffer for the slice, written out below
            slot = np.empty(writer.shape(path)[len(at) :], np_dtype)
        buffer = slot
        if tensor.dtype == np.uint16:
            slot = slot.view(np.uint16)
        part = _split(tensor, entry) if entry.split is not None else tensor
        if part is None or not _place(slot, part, entry.transform, slot.shape):
            raise ConversionError(
                f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, which does not fit the native "
                f"shape {tuple(slot.shape)} implied by config.json."
            )
        if writer is not None:
            writer.write(path, at, buffer)
        del tensor, part, slot, buffer
    _check_all_filled(folder, shapes, seen, cfg)
    return params


SLAB_BYTES = 64 << 20


def _stream_in_slabs(reader, file, name, hf_shape, entry, writer, path, at, np_dtype) -> bool:
    """Copy a large 2-D tensor that maps to a 2-D native slice (an embedding, or a Linear weight
    [out, in] -> kernel [in, out]) through memory a slab of rows at a time; False if it does not
    qualify (then it is read whole)."""
    native = writer.shape(path)[len(at) :]
    itemsize = np.dtype(np_dtype).itemsize
    if len(hf_shape) != 2 or len(native) != 2 or entry.split is not None:
        return False
    if math.prod(hf_shape) * itemsize <= SLAB_BYTES:
        return False
    transposed = entry.transform is LINEAR_IN
    if not (transposed or entry.transform is IDENTITY) or native != (
        hf_shape[::-1] if transposed else hf_shape
    ):
        return False
    step = writer.slab_rows(path, transposed)
    for start in range(0, hf_shape[0], step):
        stop = min(start + step, hf_shape[0])
        rows = reader.rows(file, name, start, stop).astype(np_dtype, copy=False)
        if transposed:  # HF rows start:stop are kernel columns start:stop
            writer.write(path, (*at, slice(None), slice(start, stop)), np.ascontiguousarray(rows.T))
        else:
            writer.write(path, (*at, slice(start, stop)), rows)
    return True


def _skip_mtp_layers(names: list[str], num_layers: int) -> list[str]:
    """Drop (with a warning) tensors of layers past the decoder and its configured multi-token-
    prediction modules (a config.json whose num_nextn_predict_layers is lower than the
    checkpoint's): transformers ignores them too."""
    import re
    import sys

    mtp = [
        n
        for n in names
        if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) >= num_layers
    ]
    if mtp:
        print(
            f"warning: skipping {len(mtp)} multi-token-prediction tensor(s) (layers >= {num_layers}, "
            f"e.g. {mtp[0]}): config.json's num_nextn_predict_layers does not cover them.",
            file=sys.stderr,
        )
    return [n for n in names if n not in set(mtp)]


def _split(tensor: np.ndarray, entry) -> np.ndarray | None:
    """Part `part` of `parts` equal slices along `entry.split_axis`; None if it does not divide."""
    part, parts = entry.split
    axis = entry.split_axis % tensor.ndim
    size, rest = divmod(tensor.shape[axis], parts)
    if rest:
        return None
    if entry.interleaved:
        return tensor[(slice(None),) * axis + (slice(part, None, parts),)]
    return tensor[(slice(None),) * axis + (slice(part * size, (part + 1) * size),)]


def _check_all_filled(folder: Path, params: dict, seen: dict, cfg: Config) -> None:
    """Every native parameter, at every stacked layer and every expert index, got a tensor."""
    stacked_names = stacked_segments(cfg)
    not_filled = []
    for path, leaf in _flat(params):
        got = seen.get(path, set())
        layers = range(leaf.shape[0]) if path[0] in stacked_names else [None]
        per_expert = any(e is not None for _, e in got)
        experts = range(cfg.num_experts) if per_expert else [None]
        if not got or any((i, j) not in got for i in layers for j in experts):
            not_filled.append(".".join(path))
    if not_filled:
        raise ConversionError(f"{folder}: native parameters {not_filled[:5]} received no tensor.")


def _place(slot: np.ndarray, tensor: np.ndarray, transform, shape) -> bool:
    """Write `transform.to_native(tensor)` into `slot` (a contiguous view); False if shapes do not fit.

    2-D transposes are copied in blocks of rows: a plain strided transpose of a large matrix thrashes
    the cache and runs ~9x slower."""
    if tensor.ndim == 3 and transform is EXPERTS_LINEAR:  # expert by expert, each a 2-D transpose
        if len(shape) != 3 or tensor.shape[0] != shape[0]:
            return False
        return all(_place(slot[e], tensor[e], LINEAR_IN, shape[1:]) for e in range(shape[0]))
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
