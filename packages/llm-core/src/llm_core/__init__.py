"""llm-core: configuration, models and sharding for LLMs in JAX."""

from llm_core.config import (
    Config,
    ConfigError,
    load_config,
    resolve_mesh_shape,
    shipped_model_names,
)
from llm_core.io import CheckpointError, load, save
from llm_core.layers.kv_cache import ContiguousKV, PagedKV, map_layer_caches
from llm_core.layers.latent_cache import LatentKV, PagedLatentKV
from llm_core.layers.linear import GroupedLinear, Linear, iter_linears
from llm_core.layers.lora import (
    Int8Linear,
    LoRAGroupedLinear,
    LoRALinear,
    LoRAParam,
    apply_lora,
    iter_lora,
    lift_into_lora,
    lora_dropout_key,
    merged_params,
    strip_lora,
)
from llm_core.layers.moe import RouterBias
from llm_core.layers.packed import PackedLinear, pack_linears, packs_on_this_backend
from llm_core.layers.sequence_parallel import length_axes
from llm_core.models import Transformer, build_model, layer_placement, unstack_layers
from llm_core.models.counting import count_params, matmul_params
from llm_core.models.pipeline import bubble_fraction
from llm_core.sharding import (
    create_mesh,
    logical_sharding,
    logical_to_mesh_spec,
    shard_count,
    state_shardings,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "ContiguousKV",
    "GroupedLinear",
    "Int8Linear",
    "LatentKV",
    "Linear",
    "LoRAGroupedLinear",
    "LoRALinear",
    "LoRAParam",
    "PackedLinear",
    "PagedKV",
    "PagedLatentKV",
    "RouterBias",
    "Transformer",
    "__version__",
    "apply_lora",
    "bubble_fraction",
    "build_model",
    "count_params",
    "create_mesh",
    "iter_linears",
    "iter_lora",
    "layer_placement",
    "length_axes",
    "lift_into_lora",
    "load",
    "load_config",
    "logical_sharding",
    "logical_to_mesh_spec",
    "lora_dropout_key",
    "map_layer_caches",
    "matmul_params",
    "merged_params",
    "pack_linears",
    "packs_on_this_backend",
    "resolve_mesh_shape",
    "save",
    "shard_count",
    "shipped_model_names",
    "state_shardings",
    "strip_lora",
    "unstack_layers",
]
