"""llm-core: configuration, models and sharding for LLMs in JAX."""

from llm_core.config import (
    Config,
    ConfigError,
    load_config,
    resolve_mesh_shape,
    shipped_model_names,
)

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "__version__",
    "load_config",
    "resolve_mesh_shape",
    "shipped_model_names",
]
