"""The typed, frozen configuration object.

One flat namespace (as in MaxText) so that every key can be overridden as `key=value` on the command
line. Values that can be derived (head_dim, num_kv_heads, per-layer attention kinds) are filled in by
`Config.resolve()`; impossible combinations raise `ConfigError` naming the keys at fault.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

MESH_AXES: tuple[str, ...] = (
    "data",
    "stage",
    "fsdp",
    "fsdp_transpose",
    "sequence",
    "context",
    "tensor",
    "expert",
)

# Logical axis name -> mesh axes it is sharded over (first match that fits the mesh wins).
DEFAULT_LOGICAL_AXIS_RULES: list[list] = [
    ["batch", ["data", "fsdp", "fsdp_transpose", "expert"]],
    ["activation_length", ["context", "sequence"]],
    ["activation_embed", ["tensor"]],
    ["activation_heads", ["tensor", "sequence"]],
    ["activation_kv_heads", ["tensor", "sequence"]],
    ["activation_mlp", ["tensor", "sequence"]],
    ["activation_vocab", ["tensor"]],
    ["vocab", ["tensor"]],
    # `sequence` joins `tensor` inside the matmuls (sequence parallelism gathers their inputs)
    ["embed", ["fsdp", "fsdp_transpose", "context"]],
    ["heads", ["tensor", "sequence"]],
    ["kv_heads", ["tensor", "sequence"]],
    ["head_dim", []],
    ["mlp", ["tensor", "sequence", "fsdp_transpose"]],
    ["exp", ["expert"]],
    ["layers", ["stage"]],
    ["norm", []],
]


class ConfigError(ValueError):
    """A configuration problem, with the key at fault and what to change in the message."""


Family = Literal[
    "llama",
    "mistral",
    "mixtral",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt3",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "llama4",
]

# Mesh axes that no code path implements yet: setting one above 1 is an error naming the key.
UNIMPLEMENTED_MESH_AXES: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    # --- model identity
    model_name: str = "default"
    model_family: Family = "llama"

    # --- model dimensions
    vocab_size: int = 32000
    emb_dim: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None  # default: num_heads (MHA)
    head_dim: int | None = None  # default: emb_dim // num_heads
    mlp_dim: int = 1408
    mlp_activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU / GeGLU when true, plain up/down when false
    norm_kind: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma's RMSNorm computes x * (1 + w)
    post_norms: bool = False  # Gemma 2/3: extra norms after attention and MLP
    tie_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(emb_dim)
    attention_bias: bool = False
    mlp_bias: bool = False

    # --- positions
    position_embedding: Literal["rope", "learned"] = "rope"
    max_position_embeddings: int = 8192
    rope_kind: Literal["default", "linear", "llama3", "yarn"] = "default"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3 local layers use their own base
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3 / yarn
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_attention_factor: float | None = None  # default 0.1 * ln(factor) + 1
    # DeepSeek YaRN: with both set the cos/sin factor is mscale(factor, rope_yarn_mscale) /
    # mscale(factor, rope_yarn_mscale_all_dim); MLA also multiplies its softmax scale by
    # mscale(factor, rope_yarn_mscale_all_dim)^2 (mscale(f, m) = 0.1 m ln f + 1), as transformers does
    rope_yarn_mscale: float | None = None
    rope_yarn_mscale_all_dim: float | None = None
    # rotate interleaved pairs (x0, x1), (x2, x3), ... instead of the two halves (DeepSeek)
    rope_interleave: bool = False
    rope_yarn_truncate: bool = True  # round YaRN's correction range to whole dims (GPT-OSS: false)
    partial_rotary_factor: float = 1.0

    # --- attention
    attention_backend: Literal["dot_product", "chunked", "flash"] = "dot_product"
    attention_chunk_size: int = 512  # key/value chunk for the `chunked` backend
    sliding_window: int | None = None
    attention_pattern: list[str] | None = None  # repeating group, e.g. [local, global]
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None  # default: head_dim
    attention_sinks: bool = False  # a learned logit per head in every softmax row (GPT-OSS)
    # Llama 4: layer i has no RoPE when (i + 1) % nope_layer_interval == 0 (0: RoPE everywhere);
    # on RoPE layers tokens attend only within aligned chunks of attention_local_chunk positions
    # (HF attention_chunk_size) and q, k get a weightless RMS ("L2") norm after RoPE (qk_l2_norm);
    # on NoPE layers attn_temperature_tuning scales queries by
    # log(floor((position + 1) / attn_floor_scale) + 1) * attn_temperature_scale + 1
    nope_layer_interval: int = 0
    attention_local_chunk: int | None = None
    qk_l2_norm: bool = False
    attn_temperature_tuning: bool = False
    attn_floor_scale: float = 8192.0
    attn_temperature_scale: float = 0.1
    # gqa: multi-head / grouped-query attention; mla: DeepSeek multi-head latent attention (queries
    # through an optional q_lora_rank bottleneck, keys and values from one kv_lora_rank latent per
    # token plus a qk_rope_head_dim rotary key shared by the heads; caches hold only those)
    attention_kind: Literal["gqa", "mla"] = "gqa"
    q_lora_rank: int = 0  # mla: 0 = a plain query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # --- layer kinds (see llm_core.models.placement) and mixture of experts
    ffn_kind: Literal["dense", "moe"] = "dense"  # feed-forward kind of the layers
    first_num_dense_layers: int = 0  # moe: the first k layers stay dense
    moe_layer_interval: int = 1  # moe: layer i is MoE when (i + 1) % interval == 0
    mlp_only_layers: list[int] = field(default_factory=list)  # moe: these layers stay dense
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k
    moe_mlp_dim: int = 0  # hidden width of one expert; 0: mlp_dim
    # softmax_topk: softmax over all experts, keep the top k (renormalised if norm_topk_prob);
    # sigmoid_topk (DeepSeek-V3): sigmoid scores, a per-expert bias (not trained by the optimizer)
    # added for choosing the k experts only, the weights from the unbiased scores
    # topk_softmax (GPT-OSS): the top k logits, then a softmax over those k; topk_sigmoid_input
    # (Llama 4): each chosen expert's input is scaled by the sigmoid of its logit, outputs added
    router_kind: Literal["softmax_topk", "sigmoid_topk", "topk_softmax", "topk_sigmoid_input"] = (
        "softmax_topk"
    )
    norm_topk_prob: bool = True
    # group-limited routing: experts in moe_num_groups equal groups, only the best
    # moe_topk_groups groups are eligible (group score: max score for softmax_topk, sum of the top
    # two biased scores for sigmoid_topk); 1 = no groups
    moe_num_groups: int = 1
    moe_topk_groups: int = 1
    # what experts of dropped groups score before the top-k: neg_inf (DeepSeek's code and
    # transformers' DeepseekV3) or zero (transformers' DeepseekV2 and the Hub's remote DeepSeek-V3
    # code; differs only where every eligible score is <= 0)
    router_group_mask: Literal["neg_inf", "zero"] = "neg_inf"
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by this
    # an always-on MLP of num_shared_experts * moe_mlp_dim in every MoE layer (DeepSeek)
    num_shared_experts: int = 0
    moe_router_bias: bool = False  # a bias on the router logits (GPT-OSS)
    moe_expert_bias: bool = False  # biases on every expert's gate, up and down products (GPT-OSS)
    # the experts' gating: standard = act(gate) * up (mlp_activation); clamped_swiglu (GPT-OSS) =
    # (clip(up, -limit, limit) + 1) * g * sigmoid(swiglu_alpha * g), g = min(gate, swiglu_limit)
    moe_gating: Literal["standard", "clamped_swiglu"] = "standard"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # DeepSeek-V3 multi-token prediction: mtp_num_layers extra modules, module k predicting the
    # token k + 2 ahead from module k - 1's output (the main model's for k = 1) and the embedding of
    # token k + 1 ahead; llm-train adds mtp_loss_scaling_factor x their mean loss (training only)
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    # aux-loss-free balancing (sigmoid_topk): after every step llm-train moves each expert's bias
    # by rate * sign(mean load - expert load); 0 = off
    router_bias_update_rate: float = 0.0
    # null: dropless (every token reaches its k experts); else each expert takes at most
    # ceil(capacity_factor * tokens * k / num_experts) tokens and the rest skip that expert
    moe_capacity_factor: float | None = None
    # dropless expert matmuls: grouped_matmul (llm-kernels: C++ on CPU, Pallas on TPU/GPU),
    # ragged_dot (XLA's; dense over all experts on the CPU), tiled (rows padded to tiles per
    # expert, one batched matmul), dense (every expert on every row); auto: grouped_matmul on the
    # CPU with the compiled kernels (measured fastest), tiled elsewhere (Pallas not yet measured)
    moe_matmul: Literal["auto", "grouped_matmul", "ragged_dot", "tiled", "dense"] = "auto"
    moe_aux_loss_weight: float = 0.0  # llm-train adds weight * load-balancing loss
    moe_z_loss_weight: float = 0.0  # llm-train adds weight * router z-loss

    # int8: every Linear except MoE routers stored as int8 with per-output-channel scales (weight-
    # only post-training quantization for serving: `llm-convert quantize`); MoE experts stay float.
    # int4: the same Linear modules as int4, one scale per group of weight_quantization_group_size
    # inputs (must be even and divide every quantized Linear's input size) and output channel
    weight_quantization: Literal["none", "int8", "int4"] = "none"
    weight_quantization_group_size: int = 128
    # quantized training through qwix (llm_core/layers/qat.py): the attention, MLP and MoE expert
    # matmuls run on int8 or float8 (e4m3) operands, gradients pass straight through; fp8_full also
    # quantizes the backward's incoming gradients to e5m2. Weights and checkpoints stay float.
    quantization: Literal["none", "int8", "fp8", "fp8_full"] = "none"
    # 0: one scale per output channel (weights) / per token (activations); N: per N-wide tile of
    # the contraction axis (must divide every quantized Linear's input size)
    quantization_tile_size: int = 0

    # --- LoRA (llm_core.layers.lora): adapters on the Linear modules whose path matches
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_targets: str = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"  # regex over module paths
    # dropout on the adapters' input during training steps (PEFT's lora_dropout); dense adapters only
    lora_dropout: float = 0.0
    # also adapt MoE expert weights matched by lora_targets (per-expert A and B, merged into the
    # expert kernels in the step); off by default: E x rank x (in + out) per projection per layer
    lora_experts: bool = False
    # int8: QLoRA, the frozen base kernels of the adapted modules stored as int8 with per-output-
    # channel scales (a quarter of float32 memory), dequantized in the matmul
    lora_base_quantization: Literal["none", "int8"] = "none"

    # --- numerics and memory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "save_dots", "save_dots_no_batch", "offload_dots"] = (
        "none"
    )

    # --- mesh: -1 means "fill with the remaining devices" (at most one per kind)
    ici_data_parallelism: int = 1
    ici_stage_parallelism: int = 1
    ici_fsdp_parallelism: int = -1
    ici_fsdp_transpose_parallelism: int = 1
    # sequence parallelism (Megatron-style; llm_core/layers/sequence_parallel.py): norms and residuals
    # split over `sequence` on the length axis; attention and MLP matmuls gather their input and run
    # tensor-parallel over `tensor` x `sequence`, reduce-scattering their output back
    ici_sequence_parallelism: int = 1
    ici_context_parallelism: int = 1
    # context parallelism: the sequence split over the `context` axis; all_gather: each device keeps
    # its queries and gathers K/V (and their positions) across the axis; ring: K/V blocks travel
    # around the axis with ppermute under an online softmax (no device holds the whole sequence)
    context_parallel_strategy: Literal["all_gather", "ring"] = "all_gather"
    # causal load balance: the sequence is reordered inside the model so that device i of N holds
    # chunks i and 2N - 1 - i of 2N (positions travel with the tokens; the loss sees the original
    # order); the ring then skips the same share of fully masked blocks on every device
    context_parallel_load_balance: bool = False
    ici_tensor_parallelism: int = 1
    ici_expert_parallelism: int = 1
    # pipeline parallelism (`stage` axis > 1; llm_core/models/pipeline.py): the batch is cut into
    # num_pipeline_microbatches (a multiple of the stage count; 0: one per stage) that flow through
    # the stages; num_pipeline_repeats > 1 places the layers circularly (stage s holds layer chunks
    # s, s + stages, ...), which shrinks the idle share to (S - 1) / (microbatches * repeats + S - 1)
    num_pipeline_microbatches: int = 0
    num_pipeline_repeats: int = 1
    dcn_data_parallelism: int = -1
    dcn_stage_parallelism: int = 1
    dcn_fsdp_parallelism: int = 1
    dcn_fsdp_transpose_parallelism: int = 1
    dcn_sequence_parallelism: int = 1
    dcn_context_parallelism: int = 1
    dcn_tensor_parallelism: int = 1
    dcn_expert_parallelism: int = 1
    logical_axis_rules: list[list] = field(
        default_factory=lambda: [list(r) for r in DEFAULT_LOGICAL_AXIS_RULES]
    )

    # --- run
    run_name: str = "run"
    base_output_dir: str = "runs"
    steps: int = 100
    global_batch_size: int = 8
    seq_len: int = 256
    seed: int = 0

    # --- optimisation
    optimizer: Literal["adamw", "adam", "sgd", "lion", "adafactor"] = "adamw"
    learning_rate: float = 3e-4
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    z_loss: float = 0.0
    # > 1: the output head and the loss run over this many sequence chunks (each recomputed in the
    # backward), so [batch, seq, vocab] logits never exist whole; seq_len must divide by it
    vocab_tiling_chunks: int = 1

    # --- data
    dataset_kind: Literal["synthetic", "text", "jsonl", "parquet", "arrayrecord", "hf"] = (
        "synthetic"
    )
    dataset_path: str = ""
    dataset_field: str = "text"
    tokenizer_path: str = ""
    packing: bool = True
    eval_fraction: float = 0.0
    eval_every: int = 0
    data_workers: int = 0

    # --- logging and checkpoints
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    profile_start_step: int = -1
    profile_end_step: int = -1

    # --- llm-train additions (owned by packages/llm-train) -------------------------------------
    eval_batches: int = 4  # batches per periodic eval
    dataset_split: str = "train"  # Hugging Face datasets: split to read
    shuffle_data: bool = True
    # > 1: packed rows are shuffled within windows of this many rows (grain's window shuffle), so
    # a batch mixes many documents even when each document fills many rows; 0 or 1: off
    shuffle_window: int = 0
    tokenizer_add_eos: bool = True  # append the tokenizer's EOS (if any) to every document
    tensorboard: bool = True
    console_progress: bool = True
    coordinator_address: str = ""  # multi-host: "host:port" of process 0
    num_processes: int = 0  # 0: from the environment / cluster auto-detection
    process_id: int = -1  # -1: from the environment / cluster auto-detection
    # JAX's persistent compilation cache: "auto" = <base_output_dir>/.jax_cache (shared by the runs
    # there, so a second run skips compiling); a path; or "" (off)
    compilation_cache_dir: str = "auto"
    # Records: "text" (one document per record, every token trained) or "sft" (chat `messages`,
    # `prompt`/`completion`, or `text` records; only assistant / completion tokens are trained)
    # "preference": {"prompt", "chosen", "rejected"} records for objective=dpo; "prompts":
    # {"prompt", ...} records for objective=grpo (other fields go to the reward functions)
    dataset_format: Literal["text", "sft", "preference", "prompts"] = "text"
    chat_template: str = ""  # a .jinja file; "": the tokenizer folder's tokenizer_config.json one
    skip_bad_records: bool = False  # sft: skip (and count) malformed records instead of failing
    init_from: str = ""  # native checkpoint or HF folder: parameters start from there
    # lm: next-token cross-entropy; dpo: preference pairs against a frozen reference (the starting
    # weights; with LoRA the base model, so no second copy)
    objective: Literal["lm", "dpo", "grpo"] = "lm"
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0  # sigmoid loss only: the conservative-DPO epsilon
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # GRPO / GSPO (llm_train/grpo.py, rl.py): global_batch_size = prompts x num_generations rows
    num_generations: int = 4  # completions sampled per prompt (>= 2)
    max_completion_length: int = 64
    rollout_temperature: float = 1.0
    reward_functions: list[str] = field(default_factory=list)  # "module:function" each
    reward_format_regex: str = ""  # pattern of the built-in llm_train.rewards:format_regex
    grpo_advantage: Literal["grpo", "rloo", "drgrpo"] = "grpo"
    grpo_loss_algo: Literal["grpo", "gspo"] = "grpo"
    grpo_epsilon: float = 0.2
    grpo_epsilon_high: float | None = None  # default: grpo_epsilon
    grpo_beta: float = 0.0  # KL weight to the reference; 0 skips the reference
    grpo_kl_estimator: Literal["kl", "low_var_kl"] = "low_var_kl"
    grpo_num_iterations: int = 1  # policy updates per batch of rollouts
    # --- end of llm-train additions ---------------------------------------------------------------

    # --- inference
    max_prefill_length: int = 512
    max_decode_slots: int = 8
    kv_cache_kind: Literal["contiguous", "paged"] = "contiguous"
    # auto: the compute dtype; int8: per-token, per-head scales (contiguous and paged): D + 4
    # bytes per token, head and K/V instead of 2 D (bfloat16) or 4 D (float32)
    kv_cache_dtype: Literal["auto", "int8"] = "auto"
    kv_page_size: int = 16

    # --- llm-serve additions (owned by packages/llm-serve; additive only)
    # tokens per decode slot: prompt + completion (the context limit)
    kv_cache_max_length: int = 1024
    # paged cache: pages in the shared pool; 0 = enough for every slot at full length
    kv_num_pages: int = 0
    # requests waiting for a slot; one more is refused (HTTP 429)
    max_queue_size: int = 64
    # prefix caching (llm_serve/prefix_cache.py): prefill KV of this many recent prompts kept on
    # the device; a prompt starting with a cached prompt's first page-aligned tokens prefills only
    # the rest, and with the paged cache shares those full pages with the slots holding them. 0 = off
    prefix_cache_entries: int = 0
    # on the CPU, float32 / bfloat16 Linear weights of the served model packed in 32-column panels for
    # llm_kernels.packed_matmul (decode reads them at the memory bandwidth; XLA's matmul on the
    # row-major weights does not); no effect on other platforms or without the compiled kernels
    packed_matmul: bool = True
    # --- end of llm-serve additions

    # ------------------------------------------------------------------ derived values
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.emb_dim // self.num_heads

    @property
    def resolved_num_kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def resolved_moe_mlp_dim(self) -> int:
        return self.moe_mlp_dim or self.mlp_dim

    @property
    def layer_attention_kinds(self) -> tuple[str, ...]:
        """'global' or 'local' for each layer, from the repeating `attention_pattern`."""
        pattern = self.attention_pattern or ["global"]
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def mesh_axis_sizes(self, kind: Literal["ici", "dcn"]) -> dict[str, int]:
        return {axis: getattr(self, f"{kind}_{axis}_parallelism") for axis in MESH_AXES}


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}
