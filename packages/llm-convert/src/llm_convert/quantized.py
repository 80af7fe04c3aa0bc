"""Quantized Hub checkpoints, dequantized while they are read.

- MXFP4 (GPT-OSS experts): a tensor `X` is stored as `X_blocks` uint8 [..., rows, G, 16], two e2m1
  values per byte (low nibble first), and `X_scales` uint8 [..., rows, G], an e8m0 exponent
  (2^(s - 127)) per block of 32 values. The dequantized [..., rows, G * 32] is then transposed to
  transformers' in-memory layout [..., G * 32, rows], as its `convert_moe_packed_tensors` does.
- FP8 with block scales (DeepSeek-V3): `W.weight` float8 e4m3 [out, in] and
  `W.weight_scale_inv` float32 [ceil(out / 128), ceil(in / 128)]; value = fp8 x its block's scale.

NumPy has no float8 dtype, so float8 tensors are read from the safetensors file directly (8-byte
header length, JSON header, raw little-endian data, with plain reads) and viewed through
`ml_dtypes`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from llm_convert.errors import ConversionError

FP4_E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
FP8_BLOCK = 128


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
    """(blocks [..., G, 16] uint8, scales [..., G] uint8) -> float32 [..., G * 32]."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ConversionError(
            f"MXFP4 tensor '{name}': blocks and scales must be uint8, got {blocks.dtype} and "
            f"{scales.dtype}."
        )
    if blocks.ndim < 2 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ConversionError(
            f"MXFP4 tensor '{name}': blocks {tuple(blocks.shape)} need the shape of the scales "
            f"{tuple(scales.shape)} plus a last axis of 16 bytes (32 values per scale)."
        )
    values = np.empty((*blocks.shape[:-1], 32), np.float32)
    values[..., 0::2] = FP4_E2M1[blocks & 0x0F]
    values[..., 1::2] = FP4_E2M1[blocks >> 4]
    values *= np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def mxfp4_to_hf_layout(blocks: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
    """The dequantized tensor in transformers' in-memory expert layout (last two axes swapped)."""
    return np.swapaxes(dequantize_mxfp4(blocks, scales, name), -1, -2)


def dequantize_fp8_blocks(
    weight: np.ndarray, scale_inv: np.ndarray, name: str, dtype=np.float32
) -> np.ndarray:
    """float8 [out, in] x float32 scales [ceil(out/128), ceil(in/128)] -> [out, in] in `dtype`,
    computed in float32 one row of blocks at a time (memory: the output and one block row)."""
    if weight.ndim != 2:
        raise ConversionError(f"FP8 tensor '{name}' must be 2-D, got {tuple(weight.shape)}.")
    rows, cols = weight.shape
    want = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
    if tuple(scale_inv.shape) != want:
        raise ConversionError(
            f"FP8 tensor '{name}' {tuple(weight.shape)} needs weight_scale_inv of shape {want} "
            f"(one per {FP8_BLOCK}x{FP8_BLOCK} block), got {tuple(scale_inv.shape)}."
        )
    out = np.empty((rows, cols), dtype)
    for r, start in enumerate(range(0, rows, FP8_BLOCK)):
        scale = np.repeat(scale_inv[r].astype(np.float32), FP8_BLOCK)[:cols]
        block = weight[start : start + FP8_BLOCK].astype(np.float32)
        out[start : start + FP8_BLOCK] = block * scale
    return out


def read_fp8(file: Path, name: str) -> np.ndarray:
    """A float8 tensor of a safetensors file as an ml_dtypes array (a plain read: no memory map
    whose pages would stay resident)."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    info = header[name]
    dtype = FP8_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ConversionError(f"{file}: tensor '{name}' has dtype {info['dtype']}, not float8.")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != math.prod(shape):
        raise ConversionError(
            f"{file}: float8 tensor '{name}' has {end - start} bytes for {shape}."
        )
    raw = np.fromfile(file, np.uint8, count=end - start, offset=8 + header_len + start)
    if raw.size != end - start:
        raise ConversionError(f"{file}: float8 tensor '{name}' is truncated (file too short).")
    return raw.view(dtype).reshape(shape)


def quantized_tensors(index: dict[str, Path]) -> dict[str, tuple[str, ...]]:
    """Logical tensor name -> ("mxfp4", blocks, scales) or ("fp8", weight, weight_scale_inv) for
    the quantized tensors of a checkpoint's index (tensor name -> file)."""
    out: dict[str, tuple[str, ...]] = {}
    for name in index:
        if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in index:
            base = name[: -len("_blocks")]
            out[base] = ("mxfp4", name, base + "_scales")
        elif name.endswith(".weight_scale_inv"):
            weight = name[: -len("_scale_inv")]
            if weight not in index:
                raise ConversionError(f"'{name}' has no tensor '{weight}' to scale.")
            out[weight] = ("fp8", weight, name)
    return out


def read_quantized(
    spec: tuple[str, ...], index: dict[str, Path], open_file, dtype=np.float32
) -> np.ndarray:
    """The value of one quantized tensor (see `quantized_tensors`), dequantized in float32 and
    returned in `dtype` (FP8: block row by block row, so no float32 copy of the whole tensor)."""
    kind, first, second = spec
    if kind == "mxfp4":
        with open_file(index[first]) as f:
            blocks = f.get_tensor(first)
        with open_file(index[second]) as f:
            scales = f.get_tensor(second)
        return mxfp4_to_hf_layout(blocks, scales, first[: -len("_blocks")])
    with open_file(index[second]) as f:
        scale_inv = f.get_tensor(second)
    try:
        weight = read_fp8(index[first], first)
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(
            f"{index[first]}: cannot read float8 tensor '{first}': {err}"
        ) from None
    return dequantize_fp8_blocks(weight, scale_inv, first, dtype)
