"""Hugging Face tokenizers: a tokenizer.json file or a folder (tokenizers, else transformers)."""

from __future__ import annotations

import os

from llm_core import Config, ConfigError
from llm_core.tokens import configured_eos, find_eos


class Tokenizer:
    """A thin wrapper: encode / decode / vocab_size / eos_id over `tokenizers.Tokenizer`."""

    def __init__(self, tok, eos_token: str | None = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        _, self.eos_id = find_eos(tok.token_to_id, eos_token)  # the policy llm-serve uses too

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if not path:
        raise ConfigError("tokenizer_path is empty: point it at a tokenizer.json or a folder.")
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer_path={path!r} does not exist.")
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.exists(file):
        return Tokenizer(HFTokenizer.from_file(file), configured_eos(folder))
    if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        raise ConfigError(
            f"tokenizer_path={path!r} holds neither tokenizer.json nor tokenizer_config.json."
        )
    try:  # a folder with only slow-tokenizer files: let transformers convert it
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover
        raise ConfigError(
            f"tokenizer_path={path!r} has no tokenizer.json; install transformers to load it."
        ) from None
    return Tokenizer(AutoTokenizer.from_pretrained(path).backend_tokenizer, configured_eos(folder))


def check_vocab(tokenizer: Tokenizer, cfg: Config) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.vocab_size}: set vocab_size>={tokenizer.vocab_size} or use a smaller tokenizer."
        )


def train_bpe(
    files: list[str], vocab_size: int, out_path, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (with `<|endoftext|>`) on text files; save tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train(files, trainer)
    tok.save(str(out_path))
    return Tokenizer(tok)
