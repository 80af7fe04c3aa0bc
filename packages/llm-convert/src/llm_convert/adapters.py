"""LoRA adapters of an llm-core model written as a PEFT adapter folder.

`adapter_model.safetensors` holds, for every adapted Linear, `base_model.model.<HF module>.lora_A.
weight` [r, in] and `.lora_B.weight` [out, r] (PEFT's layout for `nn.Linear`), with the HF module
names of the family's mapping table; `adapter_config.json` holds `r`, `lora_alpha` (PEFT scales by
lora_alpha / r, as llm-core does) and the target module names. `peft.PeftModel.from_pretrained` on
the base model converted with `native_to_hf` then computes what the llm-core LoRA model computes.
Only the standard Linear layout (families whose tables use `nn.Linear` weights) is supported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from llm_convert.errors import ConversionError
from llm_convert.families import FAMILIES
from llm_convert.layout import expected_tensors, get_path
from llm_convert.transforms import LINEAR_IN, LINEAR_OUT_HEADS
from llm_core import LoRAGroupedLinear, iter_lora


def adapter_tensors(model) -> tuple[dict[str, np.ndarray], list[str]]:
    """(PEFT tensors by name, target module names) of an llm-core model with LoRA adapters."""
    cfg = model.cfg
    if cfg.lora_rank <= 0:
        raise ConversionError("the model has no LoRA adapters (lora_rank is 0).")
    experts = sorted(
        "/".join(map(str, p)) for p, m in iter_lora(model) if isinstance(m, LoRAGroupedLinear)
    )
    if experts:  # PEFT's MoE adapter layouts differ between versions; the merged model is exact
        raise ConversionError(
            f"LoRA adapters on MoE experts ({', '.join(experts[:3])}) have no stable PEFT "
            "layout: export the merged model instead (llm-train export without --peft-adapter)."
        )
    family = FAMILIES[cfg.model_family]
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors, targets, exported = {}, set(), set()
    for item in expected_tensors(cfg, family, family.layouts[0]):
        if item.path[-1] != "kernel":
            continue
        try:
            node = get_path(pure, item.path[:-1])
        except KeyError:
            continue
        if "lora_a" not in node:
            continue
        if item.entry.transform not in (LINEAR_IN, LINEAR_OUT_HEADS) or item.entry.split:
            raise ConversionError(
                f"{item.name}: PEFT export supports nn.Linear weights only, not the "
                f"{item.entry.transform.name} layout of family {cfg.model_family}."
            )
        a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
        if item.stacked is not None:
            a, b = a[item.stacked], b[item.stacked]
        rank = a.shape[-1]
        module = item.name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
            a.reshape(-1, rank).T
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
            b.reshape(rank, -1).T
        )
        targets.add(module.rsplit(".", 1)[-1])
        exported.add("/".join(map(str, item.path[:-1])))
    if not tensors:
        raise ConversionError("no LoRA adapter maps onto a Hugging Face module of this family.")
    left = sorted({"/".join(map(str, p)) for p, _ in iter_lora(model)} - exported)
    if left:
        raise ConversionError(
            f"LoRA adapters on {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} have no PEFT "
            f"nn.Linear equivalent in family {cfg.model_family}: export the merged model instead."
        )
    return tensors, sorted(targets)


def save_peft_adapter(model, dst: str | Path) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` into `dst` (created)."""
    tensors, targets = adapter_tensors(model)
    cfg = model.cfg
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.astype(np.float32) for k, v in tensors.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
