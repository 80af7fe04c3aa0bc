"""Read safetensors tensors (or row ranges of them) with plain file reads instead of a memory map.

The safetensors library memory-maps a file: every page a conversion touches stays resident (and
counted in the process's RSS) until the file is closed, so converting through it holds a whole
shard besides the tensor itself. Here each read is a `numpy.fromfile` at the tensor's offset (the
format is an 8-byte header length, a JSON header, then raw little-endian data), so memory holds
just what was read, and a large tensor can be read a slab of rows at a time. The files are first
opened with the safetensors library (`hf_to_native._open`), which validates them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from llm_convert.errors import ConversionError

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U8": np.dtype(np.uint8),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class RawReader:
    """`prefix` is prepended to every tensor name asked for (a multimodal wrapper's language model
    tensors are asked for by their text-model names)."""

    def __init__(self, prefix: str = ""):
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.prefix = prefix

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    self._headers[file] = (8 + size, json.loads(f.read(size)))
            except (OSError, ValueError) as err:
                raise ConversionError(f"{file}: unreadable safetensors header: {err}") from None
        return self._headers[file]

    def info(self, file: Path, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) of tensor `name` in `file`."""
        entry = self._header(file)[1][self.prefix + name]
        return entry["dtype"], tuple(entry["shape"])

    def rows(self, file: Path, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor (all of it by default), as a fresh array."""
        data_start, header = self._header(file)
        entry = header[self.prefix + name]
        dtype, shape = DTYPES.get(entry["dtype"]), tuple(entry["shape"])
        if dtype is None:
            raise ConversionError(
                f"{file}: tensor '{name}' has unsupported dtype {entry['dtype']}."
            )
        stop = shape[0] if stop is None else stop
        row = math.prod(shape[1:]) if shape else 1
        count = (stop - start) * row if shape else 1
        offset = data_start + entry["data_offsets"][0] + start * row * dtype.itemsize
        values = np.fromfile(file, dtype=np.uint8, count=count * dtype.itemsize, offset=offset)
        if values.size != count * dtype.itemsize:
            raise ConversionError(f"{file}: tensor '{name}' is truncated (file too short).")
        return values.view(dtype).reshape((stop - start, *shape[1:]) if shape else ())
