"""llm-core: configuration, models and sharding for LLMs in JAX."""

from llm_core.config import (
    Config,
    ConfigError,
    load_config,
    resolve_mesh_shape,
    shipped_model_names,
)
from llm_core.io import CheckpointError, load, save
from llm_core.layers.kv_cache import KVCache
from llm_core.models import Transformer, build_model
from llm_core.sharding import create_mesh, logical_sharding, logical_to_mesh_spec, state_shardings

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "KVCache",
    "Transformer",
    "__version__",
    "build_model",
    "create_mesh",
    "load",
    "load_config",
    "logical_sharding",
    "logical_to_mesh_spec",
    "resolve_mesh_shape",
    "save",
    "shipped_model_names",
    "state_shardings",
]
