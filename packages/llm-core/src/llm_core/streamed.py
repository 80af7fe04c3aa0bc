"""Native checkpoints written one slice at a time, for conversions that cannot hold a model in memory.

Layout: `config.yml` + `tensors/`, one TensorStore zarr3 array per parameter (named by its dotted
path in the `nnx.to_pure_dict` tree, uncompressed, chunked one stacked layer group and one expert at
a time, and within that in chunks of at most 64 MB: along the last axis for Linear kernels, which
conversions fill column slabs of, along the first otherwise) and `tensors/index.json` listing them. `llm-convert hf-to-native` writes it through
`StreamingWriter`, so a conversion holds one Hugging Face tensor (and its native slice) at a time;
`llm_core.load` reads it like the Orbax `params/` layout, one parameter at a time, and
`open_params` gives lazy handles whose slices are read only when asked (streaming export).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import jax
import numpy as np
from flax import nnx

TENSORS = "tensors"
INDEX = "index.json"
SLICED_AXES = ("layers", "exp")  # leading axes written (and chunked) one index at a time
CHUNK_BYTES = 64 << 20


def _chunk_shape(path: tuple[str, ...], shape, axes, itemsize: int) -> list[int]:
    chunk = [1 if a in SLICED_AXES else n for a, n in zip(axes, shape, strict=True)]
    free = [i for i, a in enumerate(axes) if a not in SLICED_AXES]
    if not free:
        return chunk
    axis = free[-1] if path[-1] == "kernel" else free[0]
    others = itemsize * int(np.prod([chunk[i] for i in free if i != axis]))
    chunk[axis] = max(1, min(shape[axis], CHUNK_BYTES // max(others, 1)))
    return chunk


def _leaves(cfg) -> list[tuple[tuple[str, ...], tuple[int, ...], np.dtype, tuple]]:
    """(path, shape, dtype, logical axes) of every parameter of the model `cfg` describes."""
    from llm_core.io import abstract_model

    state = nnx.state(abstract_model(cfg), nnx.Param)
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))
        out.append((tuple(str(p) for p in path), tuple(var.shape), np.dtype(var.dtype), axes))
    return out


def _spec(folder: Path, name: str, sync: bool = True) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / name)}}
    if not sync:  # no fsync per chunk: the folder becomes visible only by the final rename
        spec["context"] = {"file_io_sync": False}
    return spec


IN_FLIGHT_BYTES = 256 << 20


class StreamingWriter:
    """Create every parameter array of `cfg` on disk, fill them slice by slice with `write`, then
    `close` (atomic rename into `path`). An exception inside `with` leaves no folder at `path`.

    Writes run in TensorStore's threads while the caller reads the next tensor, up to
    `IN_FLIGHT_BYTES` at a time (memory stays bounded). Chunks are not fsynced one by one (that
    halves throughput); the rename at `close` is what makes the folder appear, so an interrupted
    conversion leaves nothing behind, though a power loss right after it may lose written data."""

    def __init__(self, cfg, path: str | os.PathLike):
        import tensorstore as ts

        from llm_core.io import save_config

        self.final = Path(path).absolute()
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{uuid.uuid4().hex[:8]}")
        (self.tmp / TENSORS).mkdir(parents=True)
        save_config(cfg, self.tmp / "config.yml")
        self.arrays, self.index, self.chunks = {}, {}, {}
        self.pending: list[tuple[object, int]] = []  # (write future, bytes)
        self.lock = threading.Lock()  # conversions write from several threads
        for path_, shape, dtype, axes in _leaves(cfg):
            name = ".".join(path_)
            chunk = _chunk_shape(path_, shape, axes, dtype.itemsize)
            self.chunks[path_] = chunk
            self.arrays[path_] = ts.open(
                _spec(self.tmp / TENSORS, name, sync=False),
                create=True,
                dtype=ts.dtype(dtype.name),
                shape=list(shape),
                chunk_layout=ts.ChunkLayout(chunk_shape=chunk),
            ).result()
            self.index[name] = {"shape": list(shape), "dtype": dtype.name}

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...] | None:
        """The full shape of parameter `path`, or None if the model has no such parameter."""
        array = self.arrays.get(tuple(path))
        return None if array is None else tuple(array.shape)

    def slab_rows(self, path: tuple[str, ...], along_last: bool) -> int:
        """How many rows (or, `along_last`, columns) of a 2-D slice to write at a time so that each
        write fills whole chunks."""
        chunk = self.chunks[tuple(path)]
        return chunk[-1] if along_last else chunk[-2]

    def write(self, path: tuple[str, ...], index: tuple, value: np.ndarray) -> None:
        """Write `value` at `index` (leading indices: stacked group, expert; then optional slices)
        of parameter `path`."""
        target = self.arrays[tuple(path)]
        future = (target[index] if index else target).write(value)
        with self.lock:
            self.pending.append((future, value.nbytes))
        self._wait_until(IN_FLIGHT_BYTES)

    def flush(self) -> None:
        """Wait for every write so far (raising the first error)."""
        self._wait_until(0)

    def _wait_until(self, in_flight: int) -> None:
        while True:
            with self.lock:
                if not self.pending or sum(size for _, size in self.pending) <= in_flight:
                    return
                future = self.pending.pop(0)[0]
            future.result()

    def close(self) -> Path:
        self.flush()
        (self.tmp / TENSORS / INDEX).write_text(json.dumps(self.index, indent=1))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc) -> None:
        for future, _ in self.pending:  # writes still in flight would recreate files
            with contextlib.suppress(Exception):  # the error that got us here is the one to tell
                future.result()
        self.pending.clear()
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def is_streamed(root: str | os.PathLike) -> bool:
    return (Path(root) / TENSORS / INDEX).exists()


def open_params(root: str | os.PathLike, cfg) -> dict:
    """Lazy handles (TensorStore arrays: slice, then `np.asarray` reads) in the parameter tree."""
    import tensorstore as ts

    folder = Path(root) / TENSORS
    tree: dict = {}
    for path, shape, _, _ in _leaves(cfg):
        handle = ts.open(_spec(folder, ".".join(path))).result()
        if tuple(handle.shape) != shape:
            raise ValueError(
                f"{folder / '.'.join(path)} has shape {tuple(handle.shape)}, the config wants {shape}"
            )
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = handle
    return tree


def read_params(root: str | os.PathLike, cfg, shardings=None) -> dict:
    """The parameters as jax arrays, read one at a time (placed with `shardings` when given)."""
    lazy = open_params(root, cfg)
    if shardings is None:
        return jax.tree.map(lambda h: jax.device_put(np.asarray(h)), lazy)
    return jax.tree.map(lambda h, s: jax.device_put(np.asarray(h), s), lazy, shardings)
