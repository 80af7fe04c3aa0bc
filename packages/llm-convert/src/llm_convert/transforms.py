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
