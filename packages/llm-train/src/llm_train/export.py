"""Parameter-only export of a training run.

Layout of `<out>/`:
  params/     an orbax PyTree checkpoint (StandardCheckpointer) of the model's params `nnx.State`
              (`nnx.split(model, nnx.Param, ...)[1]`); restore it with `load_exported`.
  config.yml  the resolved config of the run (`llm_core.load_config(<out>/config.yml)` rebuilds it).
"""

from __future__ import annotations

import os

import jax
import yaml
from flax import nnx

from llm_core import Config, load_config
from llm_train.checkpoint import Checkpointer, load_params, save_params
from llm_train.model import build_model
from llm_train.optim import make_optimizer
from llm_train.sharding import build_mesh
from llm_train.step import Steps, abstract_model
from llm_train.trainer import run_dir


def export(cfg: Config, out: str, step: int | None = None) -> str:
    mesh = build_mesh(cfg)
    steps = Steps(cfg, mesh, make_optimizer(cfg))
    ckpt = Checkpointer(os.path.join(run_dir(cfg), "checkpoints"), use_async=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"No checkpoint to export in {ckpt.directory}: train first.")
        state, _ = ckpt.restore(steps.abstract_with_sharding(), step)
    finally:
        ckpt.close()
    os.makedirs(out, exist_ok=True)
    save_params(os.path.join(out, "params"), state["params"])
    if jax.process_index() == 0:
        with open(os.path.join(out, "config.yml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return os.path.abspath(out)


def load_exported(path: str, overrides=()) -> nnx.Module:
    """The model of an exported folder, parameters loaded (single host)."""
    cfg = load_config(os.path.join(path, "config.yml"), overrides)
    graphdef, abs_params, rest = abstract_model(cfg)
    params = load_params(os.path.join(path, "params"), abs_params)
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, rngs=nnx.Rngs(cfg.seed))
    nnx.update(model, params)
    del graphdef, rest
    return model
