"""The Python API: load_hf, hf_to_native, native_to_hf."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from llm_convert.allocator import reuse_freed_buffers
from llm_convert.errors import ConversionError
from llm_convert.hf_config import config_from_hf, read_hf_config
from llm_convert.hf_to_native import convert_hf_params
from llm_convert.native_to_hf import write_hf_folder
from llm_core import Config, Transformer, load_config
from llm_core.io import load as load_native
from llm_core.io import model_from_params, save_params

DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConversionError(
            f"dtype '{dtype}' is not supported; choose one of {', '.join(DTYPES)}."
        )


def read_hf(
    path: str | os.PathLike, dtype: str = "float32", overrides=(), writer_to=None
) -> tuple[Config, dict | None]:
    """Config and native parameters (nested dict of numpy arrays) of a Hugging Face folder; with
    `writer_to` (a path), the parameters go straight into a streamed native checkpoint there
    (`llm_core.streamed`) one slice at a time, and None is returned for them."""
    _check_dtype(dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder: pass a Hugging Face model folder.")
    hf = read_hf_config(folder)
    cfg, family = config_from_hf(
        hf,
        str(folder / "config.json"),
        {"weight_dtype": dtype, "dtype": dtype, **_as_dict(overrides)},
    )
    depth = int(hf.get("num_nextn_predict_layers") or 0)
    if family.mtp_layers_after_decoder and depth and _has_layer(folder, cfg.num_layers):
        # DeepSeek-V3's multi-token-prediction modules, when the checkpoint holds them (the Hub's
        # does; transformers' save_pretrained does not write them)
        cfg = load_config(None, {**cfg.to_dict(), "mtp_num_layers": depth})
    if writer_to is None:
        return cfg, convert_hf_params(folder, cfg, family, dtype)
    from llm_core.streamed import StreamingWriter

    with StreamingWriter(cfg, writer_to) as writer, reuse_freed_buffers():
        convert_hf_params(folder, cfg, family, dtype, writer)
        writer.close()
    return cfg, None


def _has_layer(folder: Path, layer: int) -> bool:
    from llm_convert.hf_config import tensor_prefix
    from llm_convert.hf_to_native import tensor_index

    names = tensor_index(folder, tensor_prefix(folder))
    return any(name.startswith(f"model.layers.{layer}.") for name in names)


def _as_dict(overrides) -> dict:
    from llm_core.config import parse_overrides

    return dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)


def load_hf(path: str | os.PathLike, dtype: str = "float32", overrides=()) -> Transformer:
    """A ready llm-core model from a Hugging Face folder: `model(input_ids)` -> float32 logits."""
    cfg, params = read_hf(path, dtype, overrides)
    return model_from_params(cfg, params)


def hf_to_native(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert a Hugging Face folder into a native checkpoint: config.yml + tensors/ (one
    TensorStore array per parameter, `llm_core.streamed`), streamed one tensor at a time so that
    memory stays near the largest tensor whatever the model size."""
    read_hf(src, dtype, writer_to=dst)
    return Path(dst).absolute()


def native_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write a native checkpoint as a Hugging Face folder (config.json + safetensors). A streamed
    checkpoint (`hf-to-native`'s) is read one tensor (or 64 MB slab) at a time into shards written
    header first, so memory stays near one tensor whatever the shard size; an Orbax one is loaded
    whole first."""
    from llm_core.streamed import is_streamed, open_params

    if not is_streamed(src):
        model = load_native(src)
        dtype = dtype or model.cfg.weight_dtype
        _check_dtype(dtype)
        return save_hf(model, dst, dtype, max_shard_bytes)
    try:
        cfg = load_config(Path(src) / "config.yml")
        lazy = open_params(src, cfg)
    except ValueError as err:  # ConfigError included
        raise ConversionError(f"{src}: {err}") from None
    dtype = dtype or cfg.weight_dtype
    _check_dtype(dtype)
    from llm_convert.hf_to_native import NP_DTYPES

    with reuse_freed_buffers():
        return _write_atomically(dst, lambda tmp: write_hf_folder(
            lazy, cfg, tmp, dtype, max_shard_bytes, NP_DTYPES[dtype]
        ))  # fmt: skip


def save_hf(
    model: Transformer,
    dst: str | os.PathLike,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    from llm_convert.hf_to_native import NP_DTYPES

    params = jax.tree.map(
        lambda a: np.asarray(a).astype(NP_DTYPES[dtype]),
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    )
    return _write_atomically(
        dst, lambda tmp: write_hf_folder(params, model.cfg, tmp, dtype, max_shard_bytes)
    )


def _write_atomically(dst, write) -> Path:
    """Run `write(tmp folder)`, then rename the folder to `dst`: a failure leaves no `dst`."""
    final = Path(dst).absolute()
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


QUANT_MODES = ("int8", "int4")


def quantize_native(
    src: str | os.PathLike, dst: str | os.PathLike, mode: str = "int8", group_size: int = 128
) -> Path:
    """Weight-only post-training quantization of a native checkpoint: every Linear except MoE
    routers becomes int8 with a float32 scale per output channel, or (mode int4) int4 packed two
    per byte with a float32 scale per `group_size` inputs and output channel
    (`weight_quantization` in the written config); llm-serve loads the result with the quantized
    weights as they are stored."""
    if mode not in QUANT_MODES:
        raise ConversionError(
            f"--mode {mode!r} is not supported; choose one of {', '.join(QUANT_MODES)}."
        )
    from llm_core import ConfigError
    from llm_core.io import abstract_model
    from llm_core.layers.quantize import quantize_params

    model = load_native(src)
    cfg = model.cfg
    if cfg.weight_quantization != "none" or cfg.lora_rank > 0:
        raise ConversionError(
            f"{src}: expected a float checkpoint without adapters (weight_quantization="
            f"{cfg.weight_quantization}, lora_rank={cfg.lora_rank})."
        )
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    del model
    try:
        qcfg = cfg.replace(weight_quantization=mode, weight_quantization_group_size=group_size)
        quantized = quantize_params(params, abstract_model(qcfg), group_size)
    except ConfigError as err:
        raise ConversionError(f"--group-size {group_size}: {err}") from None
    return save_params(quantized, qcfg, dst)
