"""Native checkpoints: load (and, for tests and tools, save) a model folder for serving.

Layout (what `llm-train export` writes):

    folder/
      config.yml        the resolved llm-core config
      params/           an orbax PyTree checkpoint of the model's parameter nnx.State
      tokenizer.json    (optional here; needed by the CLI and the server)

A Hugging Face folder (config.json + safetensors) is loaded through llm-convert, if installed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from llm_core import Config, build_model, load_config
from llm_serve.tokenizer import Tokenizer


@dataclass
class Loaded:
    cfg: Config
    model: nnx.Module
    tokenizer: Tokenizer | None


def save_native(path, cfg: Config, model: nnx.Module, tokenizer_file=None) -> Path:
    """Write `model`'s parameters, `cfg` and (optionally) a tokenizer.json into folder `path`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params, force=True)
        ckptr.wait_until_finished()
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


def _unwrap(tree):
    """nnx.State saved as-is stores {'value': array} per variable; reduce it to the pure dict."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return _unwrap(tree["value"])
        return {k: _unwrap(v) for k, v in tree.items()}
    return tree


def load_native(path, overrides=()) -> Loaded:
    """Load a native checkpoint folder; `overrides` are llm-core `key=value` strings (serving keys)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "config.yml").exists() or not (path / "params").exists():
        raise FileNotFoundError(
            f"{path} is not a native checkpoint: it needs config.yml and params/ "
            "(write one with `llm-train export` or llm_serve.checkpoint.save_native)."
        )
    cfg = load_config(path / "config.yml", list(overrides))
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        restored = _unwrap(ckptr.restore(path / "params"))
    expected = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    got_shapes = jax.tree.map(lambda a: tuple(np.shape(a)), restored)
    want_shapes = jax.tree.map(lambda a: tuple(a.shape), expected)
    if got_shapes != want_shapes:
        raise ValueError(
            f"params/ in {path} does not match config.yml: parameter shapes differ "
            f"(checkpoint {got_shapes}, config {want_shapes})."
        )
    restored = jax.tree.map(lambda a, e: jax.numpy.asarray(a, e.dtype), restored, expected)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    tok = Tokenizer.from_file(path) if (path / "tokenizer.json").exists() else None
    return Loaded(cfg, model, tok)


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
        if not hasattr(llm_convert, "load_hf"):
            raise SystemExit("the installed llm-convert has no load_hf(); update it.")
        cfg, model = _from_convert(llm_convert.load_hf(path), overrides)
        return Loaded(cfg, model, Tokenizer.from_file(path))
    raise FileNotFoundError(
        f"{path}: no config.yml (native checkpoint) nor config.json (Hugging Face folder) there."
    )


def _from_convert(result, overrides):
    """Accept (cfg, model) or (cfg, params state) from llm_convert.load_hf."""
    cfg, obj = result
    if overrides:
        cfg = load_config(None, {**cfg.to_dict(), **_parse(overrides)})
    if isinstance(obj, nnx.Module):
        return cfg, obj
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(
        state, _unwrap(obj if isinstance(obj, dict) else nnx.to_pure_dict(obj))
    )
    return cfg, nnx.merge(graphdef, state)


def _parse(overrides):
    from llm_core.config import parse_overrides

    return parse_overrides(overrides)
