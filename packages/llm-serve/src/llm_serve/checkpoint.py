"""Native checkpoints: load (and, for tests and tools, save) a model folder for serving.

Layout (llm-core's native format, `llm_core.save` / `llm_core.load`; what `llm-train export` and
`llm-convert hf-to-native` write):

    folder/
      config.yml        the resolved llm-core config
      params/           an orbax checkpoint of the model's parameters (nnx.to_pure_dict layout)
      tokenizer.json    (optional here; needed by the CLI and the server) + tokenizer_config.json

A Hugging Face folder (config.json + safetensors) is loaded through llm-convert, if installed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flax import nnx

import llm_core
from llm_core import Config
from llm_serve.tokenizer import Tokenizer


@dataclass
class Loaded:
    cfg: Config
    model: nnx.Module
    tokenizer: Tokenizer | None


def save_native(path, model: nnx.Module, tokenizer_file=None) -> Path:
    """Write `model` (config + parameters, via `llm_core.save`) and optionally a tokenizer.json."""
    path = llm_core.save(model, path)
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


def load_native(path, overrides=()) -> Loaded:
    """Load a native checkpoint folder; `overrides` are llm-core `key=value` strings (serving keys).

    Raises llm_core.CheckpointError when config.yml or params/ is missing or they do not match."""
    model = llm_core.load(path, list(overrides))
    path = Path(path)
    tok = Tokenizer.from_file(path) if (path / "tokenizer.json").exists() else None
    return Loaded(model.cfg, model, tok)


def load_any(path, overrides=()) -> Loaded:
    """A native checkpoint, or a Hugging Face folder through llm-convert."""
    path = Path(path)
    if (path / "config.yml").exists():
        return load_native(path, overrides)
    if (path / "config.json").exists():
        try:
            import llm_convert
        except ImportError:
            raise SystemExit(
                f"{path} is a Hugging Face folder; loading it needs llm-convert: "
                "pip install packages/llm-convert (or convert it to a native checkpoint first)."
            ) from None
        model = llm_convert.load_hf(path, overrides=list(overrides))
        return Loaded(model.cfg, model, Tokenizer.from_file(path))
    raise FileNotFoundError(
        f"{path}: no config.yml (native checkpoint) nor config.json (Hugging Face folder) there."
    )
