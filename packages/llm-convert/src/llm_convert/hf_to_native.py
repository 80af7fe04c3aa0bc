"""Stream a Hugging Face checkpoint into native parameters, one tensor at a time.

Tensors are read with plain file reads (`raw_reader.py`), transformed and copied into their place:
a preallocated native array (`load_hf`), or a streamed checkpoint on disk (`hf-to-native`, through
`llm_core.streamed.StreamingWriter`), where large 2-D weights go in 64 MB slabs. Per-expert
tensors land at their index of the stacked expert axis. Two worker threads share the work.
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
from llm_convert.hf_config import tensor_prefix
from llm_convert.layout import Item, detect_layout, get_path, has_path, stacked_segments
from llm_convert.quantized import quantized_tensors, read_quantized
from llm_convert.raw_reader import RawReader
from llm_convert.transforms import (
    EXPERTS_LINEAR,
    IDENTITY,
    LINEAR_IN,
    LINEAR_OUT_HEADS,
    transpose_into,
)
from llm_core import Config
from llm_core.io import abstract_model

SUPPORTED_DTYPES = {"F32", "BF16", "F16"}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def tensor_index(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or the files themselves.
    With `prefix` (a multimodal wrapper's language model, `hf_config.tensor_prefix`): only the
    tensors under it, named without it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ConversionError(f"{index} is not a valid safetensors index: {err}") from None
        out = {name: folder / file for name, file in weight_map.items()}
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"No *.safetensors files in {folder}.")
        out = {}
        for file in files:
            with _open(file) as f:
                out.update({name: file for name in f.keys()})  # noqa: SIM118
    if not prefix:
        return out
    return {
        name.removeprefix(prefix): file for name, file in out.items() if name.startswith(prefix)
    }


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
    prefix = tensor_prefix(folder)
    index = tensor_index(folder, prefix)
    quantized = quantized_tensors(index)  # logical name -> how to dequantize it
    if quantized and prefix:
        raise ConversionError(
            f"{folder}: quantized tensors in a multimodal checkpoint are not supported; "
            "dequantize it first."
        )
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
    # file reads (raw_reader.py): memory holds what was read, not the mapped shard. Reads and
    # transposes release the GIL, so two workers overlap them (and TensorStore's writes).
    reader = RawReader(prefix)
    for file in sorted({index[item.name] for item in expected if item.name not in quantized}):
        with _open(file):  # validate each file once with the safetensors library
            pass
    source_index = tensor_index(folder)

    def convert_one(job: tuple[Item, tuple[int, int] | None]) -> None:
        item, rows = job
        name, entry, path, stacked, expert = item
        file = index[name]
        at = tuple(i for i in (stacked, expert) if i is not None)  # layer group, expert
        if rows is not None:
            _copy_slab(reader, file, item, writer, at, np_dtype, *rows)
            return
        if name in quantized:  # MXFP4 / FP8 blocks: dequantized (in float32) to np_dtype here
            tensor = read_quantized(quantized[name], source_index, _open, np_dtype)
        else:
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

    jobs: list[tuple[int, Item, tuple[int, int] | None]] = []  # (bytes, item, rows or None)
    for item in expected:
        file = index[item.name]
        if not has_path(shapes, item.path):
            raise ConversionError(
                f"{file}: tensor '{item.name}' has no native place {'.'.join(item.path)}."
            )
        seen.setdefault(item.path, set()).add((item.stacked, item.expert))
        if item.name in quantized:  # FP8: the weight's size; MXFP4: unknown here, last
            kind, first, _ = quantized[item.name]
            size = math.prod(reader.info(file, first)[1]) if kind == "fp8" else 0
            jobs.append((size * np.dtype(np_dtype).itemsize, item, None))
            continue
        with_dtype, hf_shape = reader.info(file, item.name)
        if with_dtype not in SUPPORTED_DTYPES:
            raise ConversionError(
                f"{file}: tensor '{item.name}' has dtype {with_dtype}; supported: F32, BF16, F16, "
                "and MXFP4 (_blocks + _scales) or FP8 with weight_scale_inv."
            )
        slabs = _slabs(hf_shape, item, writer, np_dtype) if writer is not None else None
        row_bytes = math.prod(hf_shape[1:]) * np.dtype(np_dtype).itemsize
        if slabs is None:
            jobs.append((row_bytes * (hf_shape[0] if hf_shape else 1), item, None))
        else:
            jobs.extend((row_bytes * (stop - start), item, (start, stop)) for start, stop in slabs)
    jobs.sort(key=lambda job: job[0], reverse=True)  # largest first, slabs of big tensors shared
    _run_bounded(convert_one, [(item, rows) for _, item, rows in jobs], WORKERS)
    _check_all_filled(folder, shapes, seen, cfg)
    return params


SLAB_BYTES = 64 << 20
WORKERS = 2


def _run_bounded(work, items, workers: int) -> None:
    """`work(item)` for every item on `workers` threads, at most `workers` items in memory at
    once (a new one starts as soon as any finishes). On failure no further item starts, the
    running ones finish, and the error of the earliest failed item is raised: the same error
    whichever thread was faster."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(workers) as pool:
        running: dict = {}  # future -> the item's position
        failed: list[tuple[int, BaseException]] = []
        for position, item in enumerate(items):
            if len(running) >= workers:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                failed += [(running.pop(f), f.exception()) for f in done if f.exception()]
                for f in done:
                    running.pop(f, None)
                if failed:
                    break
            running[pool.submit(work, item)] = position
        done, _ = wait(running)
        failed += [(running[f], f.exception()) for f in done if f.exception()]
    if failed:
        raise min(failed, key=lambda pair: pair[0])[1]


def _slabs(hf_shape, item: Item, writer, np_dtype) -> list[tuple[int, int]] | None:
    """Row ranges [start, stop) of a large 2-D tensor that maps to a 2-D native slice (an
    embedding, or a Linear weight [out, in] -> kernel [in, out]), each copied on its own
    (`_copy_slab`), or None if it does not qualify (then it is read whole)."""
    entry, at = item.entry, tuple(i for i in (item.stacked, item.expert) if i is not None)
    native = writer.shape(item.path)[len(at) :]
    if len(hf_shape) != 2 or len(native) != 2 or entry.split is not None:
        return None
    if math.prod(hf_shape) * np.dtype(np_dtype).itemsize <= SLAB_BYTES:
        return None
    transposed = entry.transform is LINEAR_IN
    if not (transposed or entry.transform is IDENTITY) or native != (
        hf_shape[::-1] if transposed else hf_shape
    ):
        return None
    step = writer.slab_rows(item.path, transposed)
    return [(start, min(start + step, hf_shape[0])) for start in range(0, hf_shape[0], step)]


def _copy_slab(reader, file, item: Item, writer, at, np_dtype, start: int, stop: int) -> None:
    rows = reader.rows(file, item.name, start, stop).astype(np_dtype, copy=False)
    if item.entry.transform is LINEAR_IN:  # HF rows start:stop are kernel columns start:stop
        columns = np.empty(rows.shape[::-1], rows.dtype)
        transpose_into(columns, rows)
        writer.write(item.path, (*at, slice(None), slice(start, stop)), columns)
    else:
        writer.write(item.path, (*at, slice(start, stop)), rows)


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
    """Write `transform.to_native(tensor)` into `slot` (a contiguous view); False if shapes do not
    fit. 2-D transposes go through `transpose_into`."""
    if tensor.ndim == 3 and transform is EXPERTS_LINEAR:  # expert by expert, each a 2-D transpose
        if len(shape) != 3 or tensor.shape[0] != shape[0]:
            return False
        return all(_place(slot[e], tensor[e], LINEAR_IN, shape[1:]) for e in range(shape[0]))
    if tensor.ndim == 2 and transform in (LINEAR_IN, LINEAR_OUT_HEADS):
        rows, cols = tensor.shape  # native 2-D view: [cols, rows]
        fits = (shape[0] == cols) if transform is LINEAR_IN else (shape[-1] == rows)
        if not fits or math.prod(shape) != tensor.size:
            return False
        transpose_into(slot.reshape(cols, rows), tensor)
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
