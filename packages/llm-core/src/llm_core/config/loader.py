"""Layered YAML loading: base.yml -> models/<model_name>.yml -> task/user file -> key=value overrides."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from llm_core.config.schema import Config, ConfigError, config_fields
from llm_core.config.typecheck import coerce
from llm_core.config.validate import validate

CONFIG_DIR = Path(str(resources.files("llm_core.config") / "configs"))


def shipped_model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yml"))


def shipped_config_files() -> list[Path]:
    return sorted(CONFIG_DIR.rglob("*.yml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping of key: value, not {type(data).__name__}"
        )
    return data


def _find_config_file(name_or_path: str | os.PathLike) -> Path:
    """A path on disk, or the name of a shipped file ('sft', 'sft.yml', 'models/llama3-8b')."""
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (
        CONFIG_DIR / path,
        CONFIG_DIR / f"{path}.yml",
        CONFIG_DIR / "models" / f"{path}.yml",
    ):
        if candidate.exists():
            return candidate
    shipped = [p.relative_to(CONFIG_DIR).as_posix() for p in shipped_config_files()]
    close = difflib.get_close_matches(str(name_or_path), shipped, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"Config file not found: {name_or_path}.{hint} Shipped configs live in {CONFIG_DIR}."
    )


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings -> dict; values are parsed as YAML (ints, floats, bools, lists, null)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not of the form key=value.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed[key.strip()] = value
    return parsed


def _apply(values: dict[str, Any], layer: Mapping[str, Any], source: str) -> None:
    fields = config_fields()
    hints = get_type_hints(Config)
    for key, value in layer.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields.keys(), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{key}' in {source}.{hint}")
        values[key] = coerce(key, value, hints[key], source)


def load_config(
    config: str | os.PathLike | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Config:
    """Resolve a config: base.yml, then the model file named by `model_name`, then `config` (a task or
    user YAML file, or a shipped model name), then overrides. Returns a validated, frozen Config."""
    override_values = (
        dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    )
    layers: list[tuple[dict[str, Any], str]] = [(_read_yaml(CONFIG_DIR / "base.yml"), "base.yml")]
    user_layer: dict[str, Any] = {}
    user_source = ""
    if config is not None:
        path = _find_config_file(config)
        user_layer, user_source = _read_yaml(path), str(path)
        if path.parent == CONFIG_DIR / "models":  # `load_config("llama3-8b")`
            user_layer.setdefault("model_name", path.stem)

    model_name = override_values.get("model_name", user_layer.get("model_name", "default"))
    if model_name not in (None, "default"):
        model_file = CONFIG_DIR / "models" / f"{model_name}.yml"
        if not model_file.exists():
            close = difflib.get_close_matches(str(model_name), shipped_model_names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"Config key 'model_name' names an unknown model '{model_name}'.{hint} "
                f"Known models: {', '.join(shipped_model_names())}."
            )
        layers.append((_read_yaml(model_file), f"models/{model_name}.yml"))
    if user_layer:
        layers.append((user_layer, user_source))
    layers.append((override_values, "command-line overrides"))

    values: dict[str, Any] = {}
    for layer, source in layers:
        _apply(values, layer, source)
    return validate(Config(**values))
