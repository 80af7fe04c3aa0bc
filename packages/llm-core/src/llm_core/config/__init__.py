"""Typed, layered configuration: YAML files plus `key=value` overrides."""

from llm_core.config.loader import (
    CONFIG_DIR,
    load_config,
    parse_overrides,
    shipped_config_files,
    shipped_model_names,
)
from llm_core.config.schema import MESH_AXES, Config, ConfigError
from llm_core.config.validate import resolve_mesh_shape

__all__ = [
    "CONFIG_DIR",
    "MESH_AXES",
    "Config",
    "ConfigError",
    "load_config",
    "parse_overrides",
    "resolve_mesh_shape",
    "shipped_config_files",
    "shipped_model_names",
]
