"""Which kind each decoder layer is, and where it lives in the parameter tree.

A layer's kind is the tuple of choices made for it by the config: attention kind (`gqa` or `mla`,
from `attention_kind`), whether it
attends within a sliding window (`attention_pattern`), and its feed-forward kind (`dense` or `moe`,
from `ffn_kind`, `first_num_dense_layers`, `moe_layer_interval` and `mlp_only_layers`).

Layers are placed into segments. The first `first_num_dense_layers` layers form one part, the rest
another; within a part the per-layer kind tuple repeats with some period, so the part is `repeats`
stacked groups of `period` layers (scanned) plus an unstacked tail of the left-over layers. The model,
llm-serve and llm-convert all ask `layer_placement`; none re-derives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class LayerKind:
    attention: str = "gqa"
    local: bool = False  # sliding-window attention
    ffn: str = "dense"  # "dense" | "moe"
    rope: bool = True  # False: a NoPE layer (Llama 4's every `nope_layer_interval`-th)


@dataclass(frozen=True)
class Segment:
    name: str  # attribute of the Transformer holding it
    first_layer: int
    kinds: tuple[LayerKind, ...]  # one group's layers
    repeats: int  # stacked groups (1 for an unstacked tail)
    stacked: bool

    @property
    def num_layers(self) -> int:
        return len(self.kinds) * self.repeats


@dataclass(frozen=True)
class Placement:
    segments: tuple[Segment, ...]

    def locate(self, layer: int) -> tuple[str, int, int | None]:
        """(segment name, slot within the group, group index or None if unstacked) of a layer."""
        for seg in self.segments:
            offset = layer - seg.first_layer
            if 0 <= offset < seg.num_layers:
                g = len(seg.kinds)
                return seg.name, offset % g, (offset // g if seg.stacked else None)
        raise IndexError(f"layer {layer} is not in the model")


def layer_kinds(cfg) -> tuple[LayerKind, ...]:
    """The kind of every layer, from the config."""
    pattern = cfg.attention_pattern or ["global"]
    kinds = []
    for i in range(cfg.num_layers):
        moe = (
            cfg.ffn_kind == "moe"
            and i >= cfg.first_num_dense_layers
            and i not in cfg.mlp_only_layers
            and (i + 1) % cfg.moe_layer_interval == 0
        )
        local = pattern[i % len(pattern)] == "local"
        nope = cfg.nope_layer_interval > 0 and (i + 1) % cfg.nope_layer_interval == 0
        kinds.append(
            LayerKind(cfg.attention_kind, local=local, ffn="moe" if moe else "dense", rope=not nope)
        )
    return tuple(kinds)


def _period(kinds: tuple[LayerKind, ...]) -> int:
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return p
    return len(kinds)


def _segments(kinds, first_layer: int, prefix: str) -> list[Segment]:
    if not kinds:
        return []
    p = _period(kinds)
    repeats, rem = divmod(len(kinds), p)
    out = [Segment(f"{prefix}groups", first_layer, kinds[:p], repeats, stacked=True)]
    if rem:
        out.append(Segment(f"{prefix}tail", first_layer + repeats * p, kinds[:rem], 1, False))
    return out


@cache
def _placement(kinds: tuple[LayerKind, ...], first_dense: int) -> Placement:
    first = min(first_dense, len(kinds)) if any(k.ffn == "moe" for k in kinds) else 0
    segs = _segments(kinds[:first], 0, "dense_") + _segments(kinds[first:], first, "")
    return Placement(tuple(segs))


def layer_placement(cfg) -> Placement:
    return _placement(layer_kinds(cfg), cfg.first_num_dense_layers)
