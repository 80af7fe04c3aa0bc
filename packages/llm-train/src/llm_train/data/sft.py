"""Supervised fine-tuning records -> (tokens, loss mask), in the record formats TRL users know.

A record is one of (checked in this order):
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the tokenizer's chat
  template (or `chat_template`); the loss covers the assistant turns only, each through the end of
  its turn as the template writes it (e.g. `<|eot_id|>`, `<|im_end|>`), so the model learns to stop;
- prompt / completion: `{"prompt": str, "completion": str}`; the loss covers the completion and the
  EOS token appended after it;
- plain text: `{"text": str}` (`dataset_field`); every token is trained, as in pre-training.

How the assistant tokens are found, for any template: for assistant turn i the conversation is
rendered up to turn i - 1 with the generation prompt, and up to turn i; the characters between the
two renderings are turn i's trained span. The whole conversation is tokenised once (no special
tokens added: the template writes them) and a token is trained when it starts inside a span. A
template whose rendering of a conversation's prefix is not a prefix of the next rendering cannot
be masked this way and is reported, naming the record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llm_core import ConfigError
from llm_train.data.sources import DataError
from llm_train.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Encoded:
    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # int32 [n]: 1 where the token is a training target


class ChatTemplate:
    """A Hugging Face chat template (jinja2, rendered as transformers renders it)."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str = "chat_template"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DataError(f"chat template ({origin}): {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                sort_keys=sort_keys,
            )  # fmt: skip

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"{origin}: the chat template does not parse: {err}") from None
        self.special_tokens = special_tokens

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return self.template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )


def load_chat_template(chat_template: str, tokenizer_path: str) -> ChatTemplate | None:
    """`chat_template` (a .jinja file) or the `chat_template` of the tokenizer folder's
    tokenizer_config.json; None when neither exists (chat records then fail with an error)."""
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    config_path = os.path.join(folder or ".", "tokenizer_config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    specials = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):  # AddedToken serialisation
            value = value.get("content")
        if isinstance(value, str):
            specials[name] = value
    if chat_template:
        if not os.path.exists(chat_template):
            raise ConfigError(f"chat_template={chat_template!r} does not exist.")
        with open(chat_template, encoding="utf-8") as f:
            return ChatTemplate(f.read(), specials, f"chat_template={chat_template}")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: take "default"
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None
    return ChatTemplate(source, specials, f"{config_path} chat_template")


@dataclass
class RecordEncoder:
    """Turns SFT records into `Encoded`; counts what it skipped when `skip_bad_records`."""

    tokenizer: Tokenizer
    template: ChatTemplate | None
    text_field: str = "text"
    skip_bad_records: bool = False
    max_pair_tokens: int | None = None  # preference rows: at most this many tokens (seq_len + 1)
    skipped: list[str] = field(default_factory=list)

    def __call__(self, item: tuple[str, dict]) -> Encoded | None:
        where, record = item
        try:
            return self.encode(record, where)
        except DataError as err:
            if not self.skip_bad_records:
                raise
            self.skipped.append(str(err))
            return None

    def pairs(self, item: tuple[str, dict]) -> tuple[Encoded, Encoded] | None:
        """`encode_pair` for (where, record) items, skipping bad records like `__call__`."""
        where, record = item
        try:
            return self.encode_pair(record, where)
        except DataError as err:
            if not self.skip_bad_records:
                raise
            self.skipped.append(str(err))
            return None

    def encode(self, record: dict, where: str) -> Encoded:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        # Parquet / HF datasets fill a row's missing columns with null: treat those as absent
        record = {k: v for k, v in record.items() if v is not None}
        if "messages" in record:
            return self._chat(record["messages"], where)
        if "prompt" in record or "completion" in record:
            return self._prompt_completion(record, where)
        if self.text_field in record:
            text = _string(record, self.text_field, where)
            return self._with_eos(self.tokenizer.encode(text), trained=True)
        raise DataError(
            f"{where}: record has none of 'messages', 'prompt'/'completion' or "
            f"{self.text_field!r} (fields: {sorted(record)[:10]})."
        )

    def _with_eos(self, ids: list[int], trained: bool) -> Encoded:
        eos = self.tokenizer.eos_id
        ids = [*ids, eos] if eos is not None else list(ids)
        mask = np.full(len(ids), 1 if trained else 0, np.int32)
        return Encoded(np.asarray(ids, np.int32), mask)

    def _prompt_completion(self, record: dict, where: str) -> Encoded:
        prompt = _string(record, "prompt", where)
        completion = _string(record, "completion", where)
        if not completion.strip():
            raise DataError(f"{where}: 'completion' is empty: nothing to train on.")
        prompt_ids = self.tokenizer.encode(prompt)
        completion_ids = self.tokenizer.tok.encode(completion, add_special_tokens=False).ids
        done = self._with_eos(completion_ids, trained=True)
        tokens = np.concatenate([np.asarray(prompt_ids, np.int32), done.tokens])
        mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), done.mask])
        return Encoded(tokens, mask)

    def encode_pair(self, record: dict, where: str) -> tuple[Encoded, Encoded]:
        """A preference record {"prompt", "chosen", "rejected"} -> (chosen, rejected) rows whose
        trained tokens are the response only. Strings are prompt / completion pairs; message lists
        (TRL's conversational format: prompt = the conversation so far, chosen / rejected = the
        assistant reply) are rendered with the chat template."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise DataError(
                    f"{where}: preference record has no field {key!r} (fields: "
                    f"{sorted(record)[:10]}); expected prompt, chosen and rejected."
                )
        prompt = record["prompt"]
        out = []
        for key in ("chosen", "rejected"):
            answer = record[key]
            if isinstance(prompt, list) and isinstance(answer, list):
                out.append(self._chat(prompt + answer, where, train_from=len(prompt)))
            elif isinstance(prompt, str) and isinstance(answer, str):
                out.append(self._prompt_completion({"prompt": prompt, "completion": answer}, where))
            else:
                raise DataError(
                    f"{where}: 'prompt' and {key!r} must both be strings or both message lists."
                )
        limit = self.max_pair_tokens
        for key, row in zip(("chosen", "rejected"), out, strict=True):
            if limit is not None and len(row.tokens) > limit:
                raise DataError(
                    f"{where}: prompt + {key} is {len(row.tokens)} tokens, more than a row holds "
                    f"(seq_len + 1 = {limit}): raise seq_len, shorten the record, or set "
                    "skip_bad_records=true (a cut reply would bias the comparison)."
                )
        return out[0], out[1]

    def _chat(self, messages, where: str, train_from: int = 0) -> Encoded:
        if self.template is None:
            raise DataError(
                f"{where}: chat record ('messages') but the tokenizer has no chat template: "
                "set chat_template to a .jinja file or use a tokenizer_config.json with one."
            )
        _check_messages(messages, where)
        full = self.template.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < train_from:
                continue
            before = self.template.render(messages[:i], add_generation_prompt=True)
            through = self.template.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"{where}: the chat template does not render conversation prefixes as "
                    f"prefixes (assistant turn {i}), so the assistant tokens cannot be located."
                )
            spans.append((len(before), len(through)))
        if not spans:
            raise DataError(f"{where}: chat record has no assistant message: nothing to train on.")
        encoding = self.tokenizer.tok.encode(full, add_special_tokens=False)
        starts = np.asarray([s for s, _ in encoding.offsets], np.int64)
        mask = np.zeros(len(starts), np.int32)
        for lo, hi in spans:
            mask |= ((starts >= lo) & (starts < hi)).astype(np.int32)
        return Encoded(np.asarray(encoding.ids, np.int32), mask)


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: record has no field {key!r} (fields: {sorted(record)[:10]}).")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    return value


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role={m['role']!r}; expected one of {ROLES}.")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string.")


def open_records(kind: str, path: str, split: str) -> list[tuple[str, dict]]:
    """(where, record) pairs from JSONL / Parquet / Hugging Face datasets; `where` names the file
    and line (or row) for error messages."""
    from llm_train.data.sources import _files

    if kind == "jsonl":
        out = []
        for file in _files(path, "jsonl"):
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append((f"{file}:{n}", json.loads(line)))
                        except json.JSONDecodeError as err:
                            raise DataError(f"{file}:{n} is not valid JSON: {err}") from None
        return out
    if kind == "parquet":
        import pyarrow.parquet as pq

        out = []
        for file in _files(path, "parquet"):
            rows = pq.read_table(file).to_pylist()
            out.extend((f"{file} row {i}", r) for i, r in enumerate(rows))
        return out
    if kind == "hf":
        from llm_train.data.sources import load_hf_dataset

        ds = load_hf_dataset(path, split)
        return [(f"{path} [{split}] row {i}", dict(ds[i])) for i in range(len(ds))]
    raise ConfigError(
        f"dataset_format=sft reads records from dataset_kind jsonl, parquet or hf, not {kind!r}."
    )


def encode_all(records, encoder: Callable) -> list[Encoded]:
    """Encode every record up front (fine-tuning sets are small next to pre-training corpora):
    bad records fail (or are counted) before any compile."""
    out = [e for e in map(encoder, records) if e is not None]
    out = [e for e in out if not isinstance(e, Encoded) or len(e.tokens) > 1]
    if not out:
        raise DataError("no usable SFT records (all were skipped or too short).")
    return out
