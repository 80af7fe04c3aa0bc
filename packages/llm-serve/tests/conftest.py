"""Shared fixtures: a tiny model (2 layers, d=64) with a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import functools

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


def tiny_config(*overrides: str):
    vocab = hf_tokenizer().get_vocab_size()
    return load_config("bench-small.yml", [*TINY, f"vocab_size={vocab}", *overrides])


@functools.cache
def _tiny_model(overrides: tuple[str, ...]):
    cfg = tiny_config(*overrides)
    return cfg, build_model(cfg, rngs=nnx.Rngs(0))


def tiny_model(*overrides: str):
    """(cfg, model) for the tiny config; built once per set of overrides."""
    return _tiny_model(tuple(overrides))


@pytest.fixture
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()
