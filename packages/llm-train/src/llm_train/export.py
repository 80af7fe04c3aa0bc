"""Parameter-only export of a training run, in llm-core's native checkpoint layout.

`<out>/` holds:
  config.yml  the run's resolved config
  params/     an orbax PyTree checkpoint (StandardCheckpointer) of the model params as a nested dict
              (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`)
  tokenizer.json, tokenizer_config.json
              the run's tokenizer (`tokenizer_path`), when it has one, so llm-serve serves the folder
              as it is (the chat template and EOS token travel in tokenizer_config.json)
`llm_core.load(out)` rebuilds the model; llm-convert turns the folder into Hugging Face format and
llm-serve loads it. The parameters are written atomically (temporary folder renamed into place); the
tokenizer files are copied in after that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flax import nnx

import llm_core
from llm_core import Config
from llm_train.checkpoint import Checkpointer
from llm_train.data.tokenizer import load_tokenizer
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps
from llm_train.trainer import run_dir


def _restore_model(cfg: Config, step: int | None):
    mesh = build_mesh(cfg)
    steps = Steps(cfg, mesh, make_optimizer(cfg))
    ckpt = Checkpointer(os.path.join(run_dir(cfg), "checkpoints"), use_async=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"No checkpoint to export in {ckpt.directory}: train first.")
        state, _ = ckpt.restore(steps.abstract_with_sharding(), step)
    finally:
        ckpt.close()
    return nnx.merge(steps.graphdef, state["params"], state["rest"])


def export(cfg: Config, out: str, step: int | None = None) -> Path:
    """Write the params of checkpoint `step` (default: the latest) of the run `cfg` names (a LoRA
    run: merged into the base weights)."""
    path = llm_core.save(_restore_model(cfg, step), out)
    if cfg.tokenizer_path:
        export_tokenizer(cfg.tokenizer_path, path)
    return path


def export_peft_adapter(cfg: Config, out: str, step: int | None = None) -> Path:
    """A LoRA run's adapter alone as a PEFT folder, for the base model in Hugging Face format."""
    if cfg.lora_rank <= 0:
        raise llm_core.ConfigError("--peft-adapter needs a LoRA run (lora_rank > 0).")
    try:
        from llm_convert.adapters import save_peft_adapter
    except ImportError:
        raise llm_core.ConfigError(
            "--peft-adapter writes Hugging Face names through llm-convert: "
            "pip install packages/llm-convert"
        ) from None
    return save_peft_adapter(_restore_model(cfg, step), out)


def export_tokenizer(tokenizer_path: str, out: Path) -> None:
    """tokenizer.json (also for a folder of slow-tokenizer files: transformers converts it) and the
    tokenizer_config.json beside it, if any."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.tok.save(str(out / "tokenizer.json"))
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    config = os.path.join(folder or ".", "tokenizer_config.json")
    if os.path.exists(config):
        shutil.copy(config, out / "tokenizer_config.json")
