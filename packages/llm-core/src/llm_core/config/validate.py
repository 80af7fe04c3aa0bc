"""Cross-key checks: catch impossible combinations before anything is traced or compiled."""

from __future__ import annotations

import math

from llm_core.config.schema import MESH_AXES, Config, ConfigError


def validate(cfg: Config) -> Config:
    positive = (
        "vocab_size",
        "emb_dim",
        "num_layers",
        "num_heads",
        "mlp_dim",
        "global_batch_size",
        "seq_len",
        "max_position_embeddings",
        "grad_accum_steps",
        "attention_chunk_size",
    )
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"Config key '{key}' must be positive, got {getattr(cfg, key)}.")
    for key in ("num_kv_heads", "head_dim", "sliding_window"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"Config key '{key}' must be positive or null, got {value}.")
    if cfg.num_heads % cfg.resolved_num_kv_heads:
        raise ConfigError(
            f"num_heads ({cfg.num_heads}) must be divisible by num_kv_heads "
            f"({cfg.resolved_num_kv_heads}): set num_kv_heads to a divisor of num_heads."
        )
    if cfg.head_dim is None and cfg.emb_dim % cfg.num_heads:
        raise ConfigError(
            f"emb_dim ({cfg.emb_dim}) is not divisible by num_heads ({cfg.num_heads}): "
            "set head_dim explicitly."
        )
    if cfg.attention_pattern:
        bad = sorted(set(cfg.attention_pattern) - {"local", "global"})
        if bad:
            raise ConfigError(f"attention_pattern entries must be 'local' or 'global', got {bad}.")
        if "local" in cfg.attention_pattern and cfg.sliding_window is None:
            raise ConfigError(
                "attention_pattern has 'local' layers but sliding_window is null: set sliding_window."
            )
        if cfg.scan_layers and cfg.num_layers % len(cfg.attention_pattern):
            # The remainder layers run unscanned after the scanned groups; that is allowed.
            pass
    if not 0 < cfg.partial_rotary_factor <= 1:
        raise ConfigError(
            f"partial_rotary_factor must be in (0, 1], got {cfg.partial_rotary_factor}."
        )
    if cfg.seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"seq_len ({cfg.seq_len}) is beyond the model's limit max_position_embeddings "
            f"({cfg.max_position_embeddings}): lower seq_len."
        )
    if cfg.global_batch_size % cfg.grad_accum_steps:
        raise ConfigError(
            f"global_batch_size ({cfg.global_batch_size}) must be divisible by grad_accum_steps "
            f"({cfg.grad_accum_steps})."
        )
    for kind in ("ici", "dcn"):
        sizes = cfg.mesh_axis_sizes(kind)
        fills = [a for a, s in sizes.items() if s == -1]
        if len(fills) > 1:
            raise ConfigError(
                f"Only one {kind}_*_parallelism may be -1 (fill the rest); got -1 for {fills}."
            )
        bad = [a for a, s in sizes.items() if s == 0 or s < -1]
        if bad:
            raise ConfigError(f"{kind}_{bad[0]}_parallelism must be a positive int or -1.")
    for rule in cfg.logical_axis_rules:
        if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(
                f"logical_axis_rules entries must be [logical_name, [mesh axes]], got {rule!r}."
            )
        axes = rule[1] if isinstance(rule[1], list) else [rule[1]]
        unknown = [a for a in axes if a is not None and a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"logical_axis_rules: '{rule[0]}' maps to unknown mesh axes {unknown}; known: {list(MESH_AXES)}."
            )
    return cfg


def _fill(sizes: dict[str, int], total: int, kind: str) -> dict[str, int]:
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if total % fixed:
            raise ConfigError(
                f"The {kind} mesh needs a multiple of {fixed} devices (product of the fixed "
                f"{kind}_*_parallelism values), but there are {total}."
            )
        return {a: (total // fixed if s == -1 else s) for a, s in sizes.items()}
    if fixed != total:
        listing = ", ".join(f"{kind}_{a}_parallelism={s}" for a, s in sizes.items() if s != 1)
        raise ConfigError(
            f"The {kind} mesh product is {fixed} ({listing or 'all 1'}) but there are {total} "
            f"devices for it: make the product {total}, or set one {kind}_*_parallelism to -1."
        )
    return dict(sizes)


def resolve_mesh_shape(cfg: Config, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """Per-axis mesh size (ici x dcn), with -1 filled in; raises ConfigError if they cannot match."""
    if num_devices % num_slices:
        raise ConfigError(f"{num_devices} devices cannot be split into {num_slices} slices/hosts.")
    dcn = _fill(cfg.mesh_axis_sizes("dcn"), num_slices, "dcn")
    ici = _fill(cfg.mesh_axis_sizes("ici"), num_devices // num_slices, "ici")
    return {a: ici[a] * dcn[a] for a in MESH_AXES}
