"""Tokenizer wrapper: encode / decode, end-of-sequence id, chat template, and streaming detokenizer.

Loads a Hugging Face `tokenizer.json` (the `tokenizers` library). When a `tokenizer_config.json` sits
beside it with a `chat_template`, chat messages are rendered with it (Jinja, sandboxed). Without one,
the documented default template is used:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n ... <|assistant|>\\n

(one `<|role|>` line then the content and a newline per message, then `<|assistant|>\\n` to prompt the
answer).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from llm_core.tokens import find_eos


def default_chat_template(messages: list[dict]) -> str:
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token: str | None = None, chat_template=None):
        self.tok = tok
        self.chat_template = chat_template
        # the end-of-sequence policy llm-train uses too (llm_core.tokens)
        self.eos_token, self.eos_token_id = find_eos(tok.token_to_id, eos_token)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """`path`: a tokenizer.json or a folder holding one (and maybe tokenizer_config.json)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}: copy the model's tokenizer.json there."
            )
        tok = HFTokenizer.from_file(str(file))
        eos, template = None, None
        config = folder / "tokenizer_config.json"
        if config.exists():
            data = json.loads(config.read_text())
            eos = data.get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            template = data.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = next(
                    (t["template"] for t in template if t.get("name") == "default"), None
                )
        return cls(tok, eos, template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not self.chat_template:
            return default_chat_template(messages)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token="",
            eos_token=self.eos_token or "",
        )


class TextStream:
    """Turns generated token ids into text deltas and finds stop strings.

    Text is decoded from all tokens so far (so multi-byte characters and merges come out right) and a
    delta is released only when it does not end in a partial character nor could be the start of a stop
    string. When a stop string appears, the text before it is the final text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of text already released
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the new text to release (maybe empty). Sets `stopped`."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        for s in self.stop:
            i = text.find(s, max(0, self.sent - len(s)))
            if i != -1:
                self.stopped = True
                self.text = text[:i]
                return self._release(len(self.text))
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        return self._release(len(text) - hold)

    def flush(self) -> str:
        """The text held back, at the end of the stream."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
