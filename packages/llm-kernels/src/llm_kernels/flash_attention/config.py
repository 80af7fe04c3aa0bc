"""Static (hashable) settings of one attention call, shared by every backend."""

from __future__ import annotations

import dataclasses

BACKENDS = ("reference", "cpu", "pallas_tpu", "pallas_gpu")

# Per-backend default block sizes (query, key). Blocks shrink for short sequences.
DEFAULT_BLOCKS = {
    "pallas_tpu": (128, 128),
    "pallas_gpu": (64, 64),
    "cpu": (64, 64),
    "reference": (0, 0),
}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    causal: bool
    sliding_window: int | None
    logit_soft_cap: float | None
    sm_scale: float
    block_q: int
    block_k: int
    interpret: bool = False

    def visible_offset(self, q_len: int, kv_len: int) -> int:
        """Absolute position of query 0 (the ends of q and kv are aligned)."""
        return kv_len - q_len


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pick_block(
    requested: int | None, default: int, length: int, multiple: int = 8, power_of_two: bool = False
) -> int:
    """The requested block, else the default, never much larger than the (padded) length.

    Triton needs power-of-two block shapes, hence power_of_two for the GPU kernel's defaults.
    """
    if requested is not None:
        return requested
    if power_of_two:
        return min(default, max(16, 1 << (length - 1).bit_length()))
    return max(multiple, min(default, round_up(length, multiple)))
