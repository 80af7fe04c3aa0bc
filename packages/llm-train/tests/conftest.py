"""Shared helpers: a tiny model config (2 layers, emb 64, vocab 256, seq 32) and a tiny corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TINY = {
    "num_layers": 2,
    "emb_dim": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "mlp_dim": 128,
    "vocab_size": 256,
    "seq_len": 32,
    "max_position_embeddings": 64,
    "global_batch_size": 8,
    "steps": 6,
    "warmup_steps": 2,
    "learning_rate": 1e-2,
    "console_progress": False,
    "tensorboard": False,
    "compilation_cache_dir": "",  # tests stay independent; test_train covers the cache
    "async_checkpointing": False,
}

SRC = Path(__file__).resolve().parents[1] / "src"
CORE_SRC = Path(__file__).resolve().parents[2] / "llm-core" / "src"


def tiny_overrides(tmp_path, **changes) -> list[str]:
    values = {**TINY, "base_output_dir": str(tmp_path / "runs"), **changes}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(tmp_path, **changes):
    from llm_core import load_config

    return load_config(None, tiny_overrides(tmp_path, **changes))


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """Environment for a child Python: this checkout on PYTHONPATH, N simulated CPU devices."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(CORE_SRC), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A few small Python-like text files."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        body = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(20))
        (root / f"mod{i}.py").write_text(body)
    return root


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, corpus) -> Path:
    """A byte-level BPE tokenizer (vocab 256 + a few merges) trained on the corpus."""
    from llm_train.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(sorted(str(p) for p in corpus.glob("*.py")), 300, path)
    return path
