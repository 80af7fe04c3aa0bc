"""Native checkpoint round trip and the `llm-serve decode` CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_tiny_checkpoint, tiny_model, tiny_tokenizer

from llm_core import CheckpointError
from llm_serve.checkpoint import load_any, load_native
from llm_serve.engine import Engine
from llm_serve.sampling import SamplingParams
from llm_serve.scheduler import Scheduler, generate_text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_round_trip_gives_the_same_logits(checkpoint):
    cfg, model = tiny_model()
    loaded = load_native(checkpoint)
    assert loaded.cfg == cfg
    ids = jnp.array([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(loaded.model(ids)), np.asarray(model(ids)))
    assert loaded.tokenizer.encode("the quick") == tiny_tokenizer().encode("the quick")


def test_overrides_and_bad_folders(checkpoint, tmp_path):
    assert load_native(checkpoint, ["max_decode_slots=2"]).cfg.max_decode_slots == 2
    with pytest.raises(CheckpointError, match=r"config\.yml"):
        load_native(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_any(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_convert") is not None, reason="llm-convert installed"
)
def test_hf_folder_without_llm_convert_says_what_to_install(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="llm-convert"):
        load_any(tmp_path)


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "llm_serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def test_decode_cli_prints_the_greedy_completion(checkpoint):
    cfg, model = tiny_model()
    engine, params = Engine.from_model(cfg, model)
    tok = tiny_tokenizer()
    want = generate_text(
        Scheduler(engine, params, tok),
        tok.encode("the quick"),
        SamplingParams(temperature=0, max_tokens=8),
    ).text
    out = cli(
        "decode", "--checkpoint", str(checkpoint), "--prompt", "the quick", "--max-tokens", "8"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"


def test_cli_help_and_bad_flag(checkpoint):
    out = cli("decode", "--help")
    assert out.returncode == 0 and "examples:" in out.stdout and "--temperature" in out.stdout
    bad = cli("decode", "--checkpoint", str(checkpoint), "--prompt", "x", "--top-p", "0")
    assert bad.returncode != 0 and "--top-p" in bad.stderr


def test_decode_cli_on_a_hugging_face_folder(tmp_path):
    llm_convert = pytest.importorskip("llm_convert")
    pytest.importorskip("transformers")
    from conftest import hf_tokenizer
    from test_hf_parity import hf_model

    folder = tmp_path / "hf"
    hf_model().save_pretrained(folder)
    hf_tokenizer().save(str(folder / "tokenizer.json"))
    model = llm_convert.load_hf(folder)
    engine, params = Engine.from_model(model.cfg, model)
    tok = tiny_tokenizer()
    want = generate_text(
        Scheduler(engine, params, tok),
        tok.encode("the quick"),
        SamplingParams(temperature=0, max_tokens=8),
    ).text
    out = cli("decode", "--checkpoint", str(folder), "--prompt", "the quick", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
