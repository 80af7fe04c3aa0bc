"""One end-of-sequence policy for training (appended to every document) and serving (stops a
generation): the `eos_token` of a `tokenizer_config.json` beside the tokenizer when it names a token
the vocabulary has, else the first of EOS_CANDIDATES the vocabulary has, else none."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

EOS_CANDIDATES = (
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<eos>",
    "<|eos|>",
    "<|im_end|>",
)


def configured_eos(folder: str | Path) -> str | None:
    """The `eos_token` named in `folder/tokenizer_config.json`, if any."""
    config = Path(folder) / "tokenizer_config.json"
    if not config.exists():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def find_eos(
    token_to_id: Callable[[str], int | None], configured: str | None = None
) -> tuple[str | None, int | None]:
    """(eos token, its id) by the policy above; (None, None) when the vocabulary has none."""
    for token in ((configured,) if configured else ()) + EOS_CANDIDATES:
        if (i := token_to_id(token)) is not None:
            return token, i
    return None, None
