"""Where every Hugging Face tensor of a family lives in the native parameter tree.

Layer placement comes from `llm_core.layer_placement` (never re-derived here): layer i sits in a
segment (`groups`, `tail`, `dense_groups`, `dense_tail`) at slot `layer_{k}`, at an index along the
stacked axis when the segment is stacked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from llm_convert.families import Entry, Family
from llm_convert.transforms import IDENTITY
from llm_core import Config, layer_placement
from llm_core.models import layer_kinds


class Item(NamedTuple):
    name: str  # HF tensor name
    entry: Entry
    path: tuple[str, ...]  # native parameter path
    stacked: int | None  # index along the stacked layers axis, or None
    expert: int | None  # index along the expert axis (per-expert HF tensors), or None


def layer_location(cfg: Config, i: int) -> tuple[tuple[str, ...], int | None, str]:
    """(path prefix, index along the stacked axis or None, feed-forward kind) of decoder layer i."""
    placement = layer_placement(cfg)
    name, slot, group = placement.locate(i)
    segment = next(s for s in placement.segments if s.name == name)
    return (name, f"layer_{slot}"), group, segment.kinds[slot].ffn


def stacked_segments(cfg: Config) -> set[str]:
    return {s.name for s in layer_placement(cfg).segments if s.stacked}


def attention_features(cfg: Config) -> set[str]:
    """Which optional attention tensors the model has (for `Entry.attn`)."""
    mla_q = "q_lora" if cfg.q_lora_rank else "q_plain"
    features = {mla_q}
    if cfg.attention_bias:
        features |= {"bias", f"{mla_q}_bias"}
    return features


def expected_tensors(cfg: Config, family: Family, layout: str) -> list[Item]:
    """Every tensor the model needs in the given tensor layout of the family."""
    out = []
    features = attention_features(cfg)
    for entry in family.globals:
        if entry.native == ("lm_head", "kernel") and cfg.tie_embeddings:
            continue
        if entry.native == ("embedder", "positions") and cfg.position_embedding != "learned":
            continue
        out.append(Item(entry.hf, entry, entry.native, None, None))

    def layer_items(i: int, prefix: tuple[str, ...], index: int | None, ffn: str) -> None:
        for entry in family.layer:
            if entry.layout not in (None, layout) or entry.ffn not in (None, ffn):
                continue
            if entry.attn is not None and entry.attn not in features:
                continue
            experts = range(cfg.num_experts) if entry.per_expert else [None]
            for j in experts:
                name = entry.hf.format(i=i, j=j)
                out.append(Item(name, entry, prefix + entry.native, index, j))

    for i in range(cfg.num_layers):
        prefix, index, ffn = layer_location(cfg, i)
        layer_items(i, prefix, index, ffn)
    for k in range(cfg.mtp_num_layers if family.mtp_layers_after_decoder else 0):
        i, module = cfg.num_layers + k, f"mtp_{k}"  # after the decoder, of its last layer's kind
        layer_items(i, (module, "layer"), None, layer_kinds(cfg)[-1].ffn)
        for entry in family.mtp:
            out.append(Item(entry.hf.format(i=i), entry, (module, *entry.native), None, None))
        for entry in family.mtp_copies:
            if entry.native == ("lm_head", "kernel") and cfg.tie_embeddings:
                entry = replace(entry, native=("embedder", "embedding"), transform=IDENTITY)
            out.append(Item(entry.hf.format(i=i), entry, entry.native, None, None))
    return out


def detect_layout(cfg: Config, family: Family, names: set[str]) -> tuple[str, list[Item]]:
    """The family's layout that the tensor names match best (fewest missing; first on a tie)."""
    options = [(layout, expected_tensors(cfg, family, layout)) for layout in family.layouts]
    return min(options, key=lambda option: sum(item.name not in names for item in option[1]))


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def has_path(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True
