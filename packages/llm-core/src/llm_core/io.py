"""Native checkpoints: `config.yml` (the resolved config) + `params/` (an Orbax checkpoint of the
model's parameters as a nested dict), or + `tensors/` (one TensorStore array per parameter, written
slice by slice by conversions: `llm_core.streamed`). Writes go to a temporary folder renamed into
place at the end, so an interrupted save never leaves a folder that looks valid."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from llm_core.config import Config, ConfigError, load_config


class CheckpointError(ValueError):
    """A native checkpoint folder that is missing, incomplete or does not match its config."""


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config_file(path: str | os.PathLike, overrides=()) -> Config:
    return load_config(path, overrides)


def save_params(params: dict, cfg: Config, path: str | os.PathLike) -> Path:
    """Atomically write `params` (nested dict of arrays, `nnx.to_pure_dict` layout) and the config."""
    import orbax.checkpoint as ocp

    params = _to_device_leafwise(params)
    final = Path(path).absolute()
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        save_config(cfg, tmp / "config.yml")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _to_device_leafwise(tree: dict) -> dict:
    """numpy -> jax arrays one leaf at a time, dropping each numpy array as it goes (Orbax would
    otherwise copy every leaf at once, doubling peak memory). Replaces the leaves of `tree` in place."""
    for key in list(tree):
        value = tree[key]
        tree[key] = _to_device_leafwise(value) if isinstance(value, dict) else jax.device_put(value)
    return tree


def save(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Save a model's parameters + config as a native checkpoint. A LoRA model is saved merged
    (adapters folded into the (dequantized) base kernels, `lora_rank: 0`): a plain float model of
    the same family."""
    if model.cfg.lora_rank > 0:
        from llm_core.layers.lora import merged_params

        plain = model.cfg.replace(
            lora_rank=0, lora_base_quantization="none", lora_experts=False, lora_dropout=0.0
        )
        return save_params(merged_params(model), plain, path)
    return save_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg, path)


def abstract_model(cfg: Config) -> nnx.Module:
    from llm_core.models import build_model

    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def model_from_params(cfg: Config, params: dict) -> nnx.Module:
    """A model holding `params` (nested dict, `nnx.to_pure_dict` layout), without random init."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state)


def load(path: str | os.PathLike, overrides=(), shardings=None) -> nnx.Module:
    """Load a native checkpoint written by `save` / `llm-convert hf-to-native` / `llm-train export`.

    `overrides` (key=value) may change runtime settings such as dtype or attention_backend.
    """
    import orbax.checkpoint as ocp

    from llm_core.streamed import is_streamed, read_params

    root = Path(path)
    streamed = is_streamed(root)
    if not (root / "config.yml").exists() or not ((root / "params").exists() or streamed):
        raise CheckpointError(
            f"{root} is not a native checkpoint: expected config.yml and params/ (or tensors/) "
            "inside it."
        )
    try:
        cfg = load_config(root / "config.yml", overrides)
    except ConfigError as err:
        raise CheckpointError(f"{root / 'config.yml'}: {err}") from None
    if streamed:
        try:
            return model_from_params(cfg, read_params(root, cfg, shardings))
        except ValueError as err:
            raise CheckpointError(
                f"{root / 'tensors'} does not match {root / 'config.yml'}: {err}"
            ) from None
    _, abstract_state = nnx.split(abstract_model(cfg))
    target = nnx.to_pure_dict(abstract_state)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    if shardings is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
        )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore((root / "params").absolute(), target)
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{root / 'params'} does not match {root / 'config.yml'}: {err}"
            ) from None
    return model_from_params(cfg, params)


def param_bytes(params: dict) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
