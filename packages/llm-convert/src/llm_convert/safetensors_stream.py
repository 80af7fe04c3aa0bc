"""Write a safetensors file whose tensors arrive in row slabs, header first.

`safetensors.numpy.save_file` takes a dict of whole arrays, so exporting through it holds a whole
shard in memory. The format is simple (an 8-byte little-endian header length, a JSON header with
every tensor's dtype, shape and byte range, then the raw data in that order), and every shape is
known before any data is read, so the header goes first and each tensor then streams in: memory
holds one slab, never the shard. Files written here are read back with the safetensors library in
the tests.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_convert.errors import ConversionError

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype now, its data later as consecutive row slabs
    (C order; their concatenation along axis 0 is the tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    slabs: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        kind = SAFETENSORS_DTYPES[tensor.dtype.name]
        end = offset + tensor.nbytes
        header[tensor.name] = {
            "dtype": kind,
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    written = [0] * len(tensors)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for i, slab in _prefetched(tensors):
            tensor = tensors[i]
            if slab.dtype != tensor.dtype or slab.shape[1:] != tensor.shape[1:]:
                raise ConversionError(
                    f"{path.name}: tensor '{tensor.name}' produced a {slab.dtype} slab of shape "
                    f"{slab.shape}, planned {tensor.dtype} {tensor.shape}."
                )
            f.write(np.ascontiguousarray(slab).reshape(-1).view(np.uint8).data)
            written[i] += slab.nbytes
    for tensor, size in zip(tensors, written, strict=True):
        if size != tensor.nbytes:
            raise ConversionError(
                f"{path.name}: tensor '{tensor.name}' produced {size} bytes, planned {tensor.nbytes}."
            )


PREFETCH = 2  # slabs made ahead of the one being written


def _prefetched(tensors: list[PlannedTensor]) -> Iterator[tuple[int, np.ndarray]]:
    """(tensor index, slab) for every slab of every tensor, made by a thread up to PREFETCH slabs
    ahead of the caller, so reading and transposing overlap writing (all release the GIL)."""
    out: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        """Hand `item` over unless the caller has stopped listening; False then."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for i, tensor in enumerate(tensors):
                for slab in tensor.slabs():
                    if not put((i, slab)):
                        return
            put(done)
        except BaseException as err:  # handed to the caller's thread
            put(err)

    worker = threading.Thread(target=produce, name="safetensors-prefetch", daemon=True)
    worker.start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
