"""MaxText config overrides shared by maxtext_train.py and maxtext_decode.py: configs/bench-small.yml's
model in MaxText's keys (float32, dot_product attention, layers unscanned), with its side effects
(checkpoints, TensorBoard, the compilation cache) off."""

BENCH_SMALL = dict(
    hardware="cpu",
    model_name="default",
    decoder_block="llama2",
    vocab_size=32000,
    base_emb_dim=512,
    base_num_decoder_layers=8,
    base_num_query_heads=8,
    base_num_kv_heads=4,
    head_dim=64,
    base_mlp_dim=1408,
    mlp_activations="[silu,linear]",
    normalization_layer_epsilon=1e-5,
    rope_max_timescale=10000,
    logits_via_embedding=False,
    enable_dropout=False,
    dtype="float32",
    weight_dtype="float32",
    matmul_precision="default",
    attention="dot_product",
    scan_layers=False,
    enable_checkpointing=False,
    async_checkpointing=False,
    enable_tensorboard=False,
    jax_cache_dir="",
    log_config=False,
    skip_jax_distributed_system=True,
)
