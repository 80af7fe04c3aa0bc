"""Tensor layout changes between Hugging Face (torch Linear: [out, in]) and native (einsum) layouts.

Each transform is a pair (to_native, to_hf) of pure numpy functions; `shape` is the native shape of one
layer's tensor (without the stacked `layers` axis).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    name: str
    to_native: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x, shape: x.reshape(shape), lambda x: x)
# Linear weight [out, in] -> [in, out] (then split the out dim into heads x head_dim where needed).
LINEAR_IN = Transform(
    "linear",
    lambda x, shape: x.T.reshape(shape),
    lambda x: x.reshape(x.shape[0], -1).T,
)
# Output projection [embed, heads*head_dim] -> [heads, head_dim, embed].
LINEAR_OUT_HEADS = Transform(
    "linear_out_heads",
    lambda x, shape: x.T.reshape(shape),
    lambda x: x.reshape(-1, x.shape[-1]).T,
)
# GPT-2 Conv1D stores [in, out] already.
CONV1D = Transform("conv1d", lambda x, shape: x.reshape(shape), lambda x: x.reshape(x.shape[0], -1))
CONV1D_OUT_HEADS = Transform(
    "conv1d_out_heads", lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1, x.shape[-1])
)
FLAT = Transform("flat", lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1))
# Stacked expert Linear weights [experts, out, in] -> [experts, in, out] (transformers' fused experts).
EXPERTS_LINEAR = Transform(
    "experts_linear",
    lambda x, shape: x.transpose(0, 2, 1).reshape(shape),
    lambda x: x.transpose(0, 2, 1),
)


def transpose_into(out: np.ndarray, tensor: np.ndarray) -> None:
    """out[...] = tensor.T for 2-D arrays, in blocks of 16 rows: a plain strided transpose of a
    large matrix thrashes the cache and runs ~5x slower."""
    if tensor.dtype == out.dtype and tensor.dtype.itemsize == 2:  # bf16 / f16 as raw bits
        out, tensor = out.view(np.uint16), tensor.view(np.uint16)
    for start in range(0, tensor.shape[0], 16):
        out[:, start : start + 16] = tensor[start : start + 16].T


def contiguous(value: np.ndarray) -> np.ndarray:
    """`np.ascontiguousarray`, with transposed views (of 2-D matrices, or of a stack of them, as
    `to_hf` returns) copied through `transpose_into` instead of a slow strided copy."""
    if value.flags.c_contiguous:
        return value
    if value.ndim in (2, 3) and value.swapaxes(-1, -2).flags.c_contiguous:
        out = np.empty(value.shape, value.dtype)
        if value.ndim == 2:
            transpose_into(out, value.T)
        else:
            for i in range(value.shape[0]):
                transpose_into(out[i], value[i].T)
        return out
    return np.ascontiguousarray(value)
