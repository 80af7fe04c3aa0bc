"""Cross-key checks: catch impossible combinations before anything is traced or compiled."""

from __future__ import annotations

import math

from llm_core.config.schema import MESH_AXES, UNIMPLEMENTED_MESH_AXES, Config, ConfigError


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
    for key in ("data_workers", "shuffle_window"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"Config key '{key}' must be >= 0, got {getattr(cfg, key)}.")
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
        for axis in UNIMPLEMENTED_MESH_AXES:
            if sizes[axis] > 1 or (sizes[axis] == -1):
                raise ConfigError(
                    f"Config key '{kind}_{axis}_parallelism' is {sizes[axis]}, but {axis} "
                    "parallelism is not implemented yet: set it to 1."
                )
    context = cfg.ici_context_parallelism * cfg.dcn_context_parallelism
    if context > 1 and cfg.attention_backend == "flash":
        raise ConfigError(
            "ici/dcn_context_parallelism > 1 with attention_backend=flash is not implemented yet "
            "(the flash kernels take whole sequences): use attention_backend=dot_product or chunked."
        )
    if context > 1 and cfg.seq_len % context:
        raise ConfigError(
            f"seq_len ({cfg.seq_len}) must be divisible by the context parallelism ({context})."
        )
    if cfg.context_parallel_load_balance and context > 1 and cfg.seq_len % (2 * context):
        raise ConfigError(
            f"context_parallel_load_balance cuts seq_len ({cfg.seq_len}) into 2 x the context "
            f"parallelism ({context}) chunks: make seq_len divisible by {2 * context}."
        )
    sequence = cfg.ici_sequence_parallelism * cfg.dcn_sequence_parallelism
    if sequence > 1 and cfg.seq_len % (sequence * context):
        raise ConfigError(
            f"seq_len ({cfg.seq_len}) must be divisible by ici_sequence_parallelism x "
            f"dcn_sequence_parallelism ({sequence})"
            + (f" x the context parallelism ({context})." if context > 1 else ".")
        )
    tensor = cfg.ici_tensor_parallelism * cfg.dcn_tensor_parallelism
    if sequence > 1 and tensor > 0 and cfg.num_heads % (sequence * tensor):
        raise ConfigError(
            f"sequence parallelism splits the attention heads over tensor x sequence "
            f"({tensor} x {sequence}), which must divide num_heads ({cfg.num_heads}): change "
            "ici_sequence_parallelism or ici_tensor_parallelism."
        )
    _validate_pipeline(cfg)
    _validate_mla(cfg)
    _validate_llama4_attention(cfg)
    _validate_mtp(cfg)
    _validate_moe(cfg)
    _validate_routing(cfg)
    _validate_lora(cfg)
    if cfg.vocab_tiling_chunks < 1 or cfg.seq_len % cfg.vocab_tiling_chunks:
        raise ConfigError(
            f"vocab_tiling_chunks ({cfg.vocab_tiling_chunks}) must be >= 1 and divide seq_len "
            f"({cfg.seq_len})."
        )
    records = cfg.dataset_format in ("sft", "preference", "prompts")
    if records and cfg.dataset_kind not in ("jsonl", "parquet", "hf"):
        raise ConfigError(
            f"dataset_format={cfg.dataset_format} reads records, so dataset_kind must be jsonl, "
            f"parquet or hf, got dataset_kind={cfg.dataset_kind!r}."
        )
    _validate_dpo(cfg)
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


def _validate_pipeline(cfg: Config) -> None:
    stages = cfg.ici_stage_parallelism * cfg.dcn_stage_parallelism
    if cfg.num_pipeline_repeats < 1 or cfg.num_pipeline_microbatches < 0:
        raise ConfigError(
            "num_pipeline_repeats must be >= 1 and num_pipeline_microbatches >= 0 (0: one per "
            f"stage), got {cfg.num_pipeline_repeats} and {cfg.num_pipeline_microbatches}."
        )
    if stages == 1:
        if cfg.num_pipeline_microbatches or cfg.num_pipeline_repeats != 1:
            raise ConfigError(
                "num_pipeline_microbatches / num_pipeline_repeats only apply with pipeline "
                "parallelism: set ici_stage_parallelism (or dcn_stage_parallelism) > 1."
            )
        return
    if stages < 0:
        raise ConfigError("ici/dcn_stage_parallelism cannot be -1: give the stage count.")
    micro = cfg.num_pipeline_microbatches or stages
    if micro % stages:
        raise ConfigError(
            f"num_pipeline_microbatches ({micro}) must be a multiple of the stage count ({stages})."
        )
    batch = cfg.global_batch_size // cfg.grad_accum_steps
    if batch % micro:
        raise ConfigError(
            f"the batch of one step ({batch} = global_batch_size / grad_accum_steps) must divide "
            f"into num_pipeline_microbatches ({micro})."
        )
    from llm_core.models.placement import layer_placement

    chunks = stages * cfg.num_pipeline_repeats
    for seg in layer_placement(cfg).segments:
        if not seg.stacked or seg.repeats % chunks:
            raise ConfigError(
                f"num_layers ({cfg.num_layers}) cannot be cut into ici/dcn_stage_parallelism "
                f"({stages}) x num_pipeline_repeats ({cfg.num_pipeline_repeats}) equal chunks: "
                f"its {seg.name} part has {seg.num_layers} layers in groups of {len(seg.kinds)}."
            )


def _validate_grpo(cfg: Config) -> None:
    if (cfg.objective == "grpo") != (cfg.dataset_format == "prompts"):
        raise ConfigError(
            f"objective={cfg.objective} with dataset_format={cfg.dataset_format}: GRPO samples "
            "from prompt records, so set objective=grpo together with dataset_format=prompts."
        )
    if cfg.objective != "grpo":
        return
    if cfg.num_generations < 2:
        raise ConfigError(
            f"num_generations must be >= 2 for GRPO (advantages compare completions of one "
            f"prompt), got {cfg.num_generations}."
        )
    if cfg.global_batch_size % cfg.num_generations:
        raise ConfigError(
            f"global_batch_size ({cfg.global_batch_size}) must be a multiple of num_generations "
            f"({cfg.num_generations}): a batch holds whole groups of completions."
        )
    if not cfg.reward_functions:
        raise ConfigError("objective=grpo needs reward_functions (a list of 'module:function').")
    if cfg.max_completion_length < 1 or cfg.max_completion_length >= cfg.seq_len:
        raise ConfigError(
            f"max_completion_length ({cfg.max_completion_length}) must be in [1, seq_len) "
            f"(seq_len={cfg.seq_len} holds prompt + completion)."
        )
    if cfg.eval_every and cfg.eval_fraction <= 0:
        raise ConfigError(
            f"objective=grpo with eval_every={cfg.eval_every} evaluates on held-out prompts: set "
            "eval_fraction > 0 (e.g. 0.05) or eval_every=0."
        )
    if cfg.grpo_num_iterations < 1:
        raise ConfigError(f"grpo_num_iterations must be >= 1, got {cfg.grpo_num_iterations}.")


def _validate_dpo(cfg: Config) -> None:
    _validate_grpo(cfg)
    if (cfg.objective == "dpo") != (cfg.dataset_format == "preference"):
        raise ConfigError(
            f"objective={cfg.objective} with dataset_format={cfg.dataset_format}: DPO trains on "
            "preference records, so set objective=dpo together with dataset_format=preference."
        )
    if cfg.objective != "dpo":
        return
    if cfg.global_batch_size % 2:
        raise ConfigError(
            f"objective=dpo puts a chosen and a rejected row per pair in the batch: "
            f"global_batch_size must be even, got {cfg.global_batch_size}."
        )
    if (cfg.global_batch_size // cfg.grad_accum_steps) % 2:
        raise ConfigError(
            f"objective=dpo keeps each chosen / rejected pair in one microbatch: global_batch_size "
            f"({cfg.global_batch_size}) / grad_accum_steps ({cfg.grad_accum_steps}) must be even."
        )
    if cfg.dpo_beta <= 0:
        raise ConfigError(f"dpo_beta must be > 0, got {cfg.dpo_beta}.")
    if not 0 <= cfg.dpo_label_smoothing < 0.5:
        raise ConfigError(
            f"dpo_label_smoothing must be in [0, 0.5), got {cfg.dpo_label_smoothing}."
        )


def _validate_lora(cfg: Config) -> None:
    import re

    if cfg.lora_rank < 0:
        raise ConfigError(f"lora_rank must be >= 0 (0: no LoRA), got {cfg.lora_rank}.")
    group = cfg.weight_quantization_group_size
    if group <= 0 or group % 2:
        raise ConfigError(
            f"weight_quantization_group_size must be a positive even number, got {group}."
        )
    if cfg.weight_quantization != "none" and cfg.lora_rank > 0:
        raise ConfigError(
            f"weight_quantization={cfg.weight_quantization} with lora_rank > 0: for adapters over "
            "a quantized base use lora_base_quantization (QLoRA) instead."
        )
    if cfg.lora_base_quantization != "none" and cfg.lora_rank == 0:
        raise ConfigError(
            f"lora_base_quantization={cfg.lora_base_quantization} quantizes the base of LoRA "
            "adapters: set lora_rank > 0 as well."
        )
    if cfg.quantization != "none" and (cfg.lora_rank > 0 or cfg.weight_quantization != "none"):
        raise ConfigError(
            f"quantization={cfg.quantization} (quantized training) cannot be combined with "
            "lora_rank > 0 or weight_quantization yet: set quantization=none."
        )
    if cfg.quantization_tile_size < 0:
        raise ConfigError(
            f"quantization_tile_size must be >= 0 (0: per channel), got {cfg.quantization_tile_size}."
        )
    if cfg.lora_experts and cfg.lora_rank == 0:
        raise ConfigError(
            "lora_experts=true adapts MoE experts with LoRA: set lora_rank > 0 as well."
        )
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}.")
    try:
        re.compile(cfg.lora_targets)
    except re.error as err:
        raise ConfigError(
            f"lora_targets={cfg.lora_targets!r} is not a valid regex: {err}"
        ) from None


def _validate_mla(cfg: Config) -> None:
    dims = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    if cfg.attention_kind != "mla":
        return
    missing = [key for key in dims if getattr(cfg, key) <= 0]
    if missing:
        raise ConfigError(
            f"attention_kind=mla needs positive {', '.join(missing)} (the latent attention "
            "dimensions); set them in the model config."
        )
    if cfg.q_lora_rank < 0:
        raise ConfigError(
            f"q_lora_rank must be >= 0 (0: plain query projection), got {cfg.q_lora_rank}."
        )
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(
            f"qk_rope_head_dim must be even (rotary pairs), got {cfg.qk_rope_head_dim}."
        )
    if cfg.position_embedding != "rope":
        raise ConfigError("attention_kind=mla needs position_embedding=rope (its rotary key part).")
    if cfg.qk_norm:
        raise ConfigError("qk_norm is not defined for attention_kind=mla: set qk_norm=false.")
    if cfg.attention_sinks:
        raise ConfigError(
            "attention_sinks with attention_kind=mla is not implemented: set attention_sinks=false."
        )
    if cfg.kv_cache_dtype == "int8":
        raise ConfigError(
            "kv_cache_dtype=int8 with attention_kind=mla is not implemented yet (the latent cache "
            "is float): set kv_cache_dtype=auto."
        )


def _validate_mtp(cfg: Config) -> None:
    if cfg.mtp_num_layers < 0:
        raise ConfigError(f"mtp_num_layers must be >= 0, got {cfg.mtp_num_layers}.")
    if cfg.mtp_num_layers >= cfg.seq_len:
        raise ConfigError(
            f"mtp_num_layers ({cfg.mtp_num_layers}) must be below seq_len ({cfg.seq_len})."
        )


def _validate_llama4_attention(cfg: Config) -> None:
    if cfg.nope_layer_interval < 0:
        raise ConfigError(f"nope_layer_interval must be >= 0, got {cfg.nope_layer_interval}.")
    chunk = cfg.attention_local_chunk
    if chunk is not None and chunk <= 0:
        raise ConfigError(f"attention_local_chunk must be positive or null, got {chunk}.")
    if cfg.attn_floor_scale <= 0:
        raise ConfigError(f"attn_floor_scale must be positive, got {cfg.attn_floor_scale}.")


def _validate_routing(cfg: Config) -> None:
    if cfg.num_shared_experts < 0:
        raise ConfigError(f"num_shared_experts must be >= 0, got {cfg.num_shared_experts}.")
    if cfg.router_bias_update_rate < 0:
        raise ConfigError(
            f"router_bias_update_rate must be >= 0 (0: off), got {cfg.router_bias_update_rate}."
        )
    if cfg.router_bias_update_rate > 0 and cfg.router_kind != "sigmoid_topk":
        raise ConfigError(
            "router_bias_update_rate > 0 moves the expert-choice bias of router_kind=sigmoid_topk; "
            f"router_kind is {cfg.router_kind}."
        )
    groups, chosen = cfg.moe_num_groups, cfg.moe_topk_groups
    if groups < 1 or not 1 <= chosen <= groups:
        raise ConfigError(
            f"moe_topk_groups ({chosen}) must be in [1, moe_num_groups ({groups})] (HF: "
            "topk_group <= n_group)."
        )
    if cfg.ffn_kind != "moe" or groups == 1:
        return
    if cfg.num_experts % groups:
        raise ConfigError(
            f"num_experts ({cfg.num_experts}) must be divisible by moe_num_groups ({groups})."
        )
    size = cfg.num_experts // groups
    if cfg.router_kind == "sigmoid_topk" and size < 2:
        raise ConfigError(
            f"router_kind=sigmoid_topk scores a group by its top two experts: moe_num_groups "
            f"({groups}) must leave >= 2 experts per group (num_experts={cfg.num_experts})."
        )
    if cfg.num_experts_per_tok > chosen * size:
        raise ConfigError(
            f"num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds the experts in the "
            f"moe_topk_groups ({chosen}) eligible groups of {size}."
        )


def _validate_moe(cfg: Config) -> None:
    """Feed-forward kinds and experts: checked here so a bad MoE config fails before any compile."""
    if cfg.moe_layer_interval < 1:
        raise ConfigError(f"moe_layer_interval must be >= 1, got {cfg.moe_layer_interval}.")
    if not 0 <= cfg.first_num_dense_layers <= cfg.num_layers:
        raise ConfigError(
            f"first_num_dense_layers ({cfg.first_num_dense_layers}) must be in [0, num_layers "
            f"({cfg.num_layers})]."
        )
    bad = [i for i in cfg.mlp_only_layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ConfigError(
            f"mlp_only_layers has layer indices {bad} out of range [0, {cfg.num_layers - 1}] "
            f"(num_layers={cfg.num_layers})."
        )
    if cfg.ffn_kind != "moe":
        return
    if cfg.num_experts < 1:
        raise ConfigError("ffn_kind is 'moe' but num_experts is 0: set num_experts (>= 1).")
    if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
        raise ConfigError(
            f"num_experts_per_tok ({cfg.num_experts_per_tok}) must be in [1, num_experts "
            f"({cfg.num_experts})]."
        )
    if cfg.moe_mlp_dim < 0:
        raise ConfigError(f"moe_mlp_dim must be >= 0 (0: mlp_dim), got {cfg.moe_mlp_dim}.")
    if cfg.moe_capacity_factor is not None and cfg.moe_capacity_factor <= 0:
        raise ConfigError(
            f"moe_capacity_factor must be positive or null (dropless), got {cfg.moe_capacity_factor}."
        )
    experts_axis = cfg.ici_expert_parallelism * cfg.dcn_expert_parallelism
    if experts_axis > 1 and cfg.num_experts % experts_axis:
        raise ConfigError(
            f"num_experts ({cfg.num_experts}) is not divisible by the expert mesh axis "
            f"(ici_expert_parallelism x dcn_expert_parallelism = {experts_axis})."
        )


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
    shape = {a: ici[a] * dcn[a] for a in MESH_AXES}
    if cfg.ffn_kind == "moe" and cfg.num_experts % shape["expert"]:
        raise ConfigError(
            f"num_experts ({cfg.num_experts}) is not divisible by the expert mesh axis "
            f"({shape['expert']} = ici_expert_parallelism x dcn_expert_parallelism)."
        )
    return shape
