"""Where layer i lives in the native parameter tree: stacked `groups` or unstacked `tail`."""

from __future__ import annotations

from llm_core import Config


def layer_location(cfg: Config, i: int) -> tuple[tuple[str, ...], int | None]:
    """(path prefix, index along the stacked axis or None) for decoder layer i."""
    group = len(cfg.attention_pattern) if cfg.attention_pattern else 1
    num_groups = cfg.num_layers // group
    if i < num_groups * group:
        return ("groups", f"layer_{i % group}"), i // group
    return ("tail", f"layer_{i - num_groups * group}"), None


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
