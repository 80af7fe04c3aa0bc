"""Shared fixtures: a tiny model (2 layers, d=64) with a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import functools
import json
import time

import httpx
import openai
import pytest
from flax import nnx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_core import build_model, load_config
from llm_serve.tokenizer import Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "a small model writes small words, and the words make a story. ",
    "Hello world! How are you today? I am fine, thank you. ",
    "numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. ",
] * 20


@functools.cache
def hf_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer(hf_tokenizer(), eos_token="</s>")


TINY = [
    "num_layers=2",
    "emb_dim=64",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=16",
    "mlp_dim=128",
    "kv_cache_max_length=128",
    "max_prefill_length=32",
    "max_decode_slots=4",
    "kv_page_size=8",
]


def tiny_config(*overrides: str, base: str = "bench-small.yml"):
    """The tiny dimensions on top of `base` (a shipped config file: its family's blocks)."""
    vocab = hf_tokenizer().get_vocab_size()
    return load_config(base, [*TINY, f"vocab_size={vocab}", *overrides])


@functools.cache
def _tiny_model(overrides: tuple[str, ...], base: str):
    cfg = tiny_config(*overrides, base=base)
    return cfg, build_model(cfg, rngs=nnx.Rngs(0))


def tiny_model(*overrides: str, base: str = "bench-small.yml"):
    """(cfg, model) for the tiny config; built once per base and set of overrides."""
    return _tiny_model(tuple(overrides), base)


@pytest.fixture
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


# ---------------------------------------------------------------------- checkpoints and servers
def save_tiny_checkpoint(folder, *overrides: str):
    """A native checkpoint of the tiny model (+ tokenizer.json) in `folder`."""
    from llm_serve.checkpoint import save_native

    _, model = tiny_model(*overrides)
    save_native(folder, model)
    hf_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`llm-serve serve` in a subprocess on 127.0.0.1:<free port>."""

    def __init__(self, checkpoint, *settings: str, name: str = "tiny", timeout: float = 180):
        import os
        import subprocess
        import sys
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llm_serve.cli", "serve", "--checkpoint", str(checkpoint)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--model-name", name]
        if settings:
            cmd += ["--set", *settings]
        self.log = open(os.path.join(str(checkpoint), f"server-{self.port}.log"), "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"server did not start in {timeout}s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------- one server per test module
SERVER_SETTINGS = (
    "kv_cache_kind=paged", "max_queue_size=4", "kv_cache_max_length=1024", "prefix_cache_entries=4"
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("srv") / "tiny")
    proc = ServerProcess(folder, *SERVER_SETTINGS)
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def idle(server, timeout=10.0) -> dict:
    """Wait until no slot is busy; returns /health."""
    deadline = time.time() + timeout
    while True:
        health = httpx.get(server.url + "/health").json()
        if health["active_slots"] == 0 and health["queue_depth"] == 0:
            return health
        if time.time() > deadline:
            return health
        time.sleep(0.05)


def post(server, path, body, raw=False):
    data = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"})
