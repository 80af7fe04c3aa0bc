"""OpenAI request parsing (with errors naming the field at fault) and response bodies.

Supported request fields. Both endpoints: model, max_tokens, temperature, top_p, n (1-8), stream,
stream_options.include_usage, stop, seed, presence_penalty, frequency_penalty, logit_bias (token id
-> bias in [-100, 100], at most 300), and the vLLM extensions top_k, min_p, stop_token_ids,
ignore_eos. Completions: prompt (a string, a list of token ids, or a list of either: one prompt per
entry), logprobs (0-5), echo, best_of. Chat: messages (roles system, developer, user, assistant,
tool), logprobs (bool), top_logprobs (0-20), max_completion_tokens. Unknown fields are ignored, as
OpenAI does. An explicit max_tokens that does not fit in the context after the prompt is a 400
(`context_length_exceeded`); without one, generation runs until the context is full (chat) or for
16 tokens (completions, clamped to the room left).

`n` > 1 (at most N_MAX and at most the server's max_decode_slots): n choices with `index` 0..n-1, the
prompt prefilled once. Choice i samples with seed `seed + i` (a random seed when none is given), so the
choices differ yet a seeded response is reproducible; greedy (temperature 0) gives n equal choices.
Stop strings, max_tokens, logprobs and echo apply per choice; `usage.completion_tokens` sums the
choices, `prompt_tokens` counts the prompt once. Streaming chunks carry their choice's `index`, each
choice sends its own finish chunk, and `[DONE]` follows the last one. With several prompts, prompt p's
choices have indices p * n .. p * n + n - 1 and `prompt_tokens` sums the prompts.
`best_of` (completions, n <= best_of <= N_MAX, not with stream): best_of candidates are generated
and the n with the highest sum of token log-probs are returned (usage counts every candidate's
tokens, as OpenAI bills them).

`POST /tokenize` takes `{"prompt": str}` or `{"messages": [...]}` (rendered with the chat template)
and answers `{"tokens", "count", "max_model_len"}`; `POST /detokenize` takes `{"tokens": [ids]}` and
answers `{"prompt": str}` (vLLM's shapes; `parse_tokenize` / `parse_detokenize`).

Completions `echo: true` (as the OpenAI legacy API and vLLM, what lm-evaluation-harness's
log-likelihood tasks need): the text is the prompt followed by the completion, and with `logprobs: N`
the logprobs object covers the prompt tokens first (the first one's token_logprobs and top_logprobs
entries are null; the others are log p(token | tokens before it) under the model), then the
generated ones. `max_tokens: 0` is allowed with echo only: nothing is generated, finish_reason
"length". Streaming with echo works: the first chunk carries the prompt text (and its logprobs).
`echo` on chat completions is a 400.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from llm_serve.sampling import TOP_LOGPROBS_MAX, SamplingError, SamplingParams


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {
            400: "invalid_request_error",
            404: "not_found_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


N_MAX = 8  # most choices per request (`n`, `best_of`)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_MISSING = object()
_NUM = (int, float)


def _field(body: dict, name: str, types, default=_MISSING, what: str = ""):
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise APIError(400, f"'{name}' is required.", name, "missing_field")
        return default
    bad_bool = isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)
    )
    if bad_bool or not isinstance(value, types):
        names = what or "/".join(
            t.__name__ for t in (types if isinstance(types, tuple) else (types,))
        )
        raise APIError(
            400, f"'{name}' must be {names}, got {type(value).__name__}.", name, "invalid_type"
        )
    return value


@dataclass
class ParsedRequest:
    model: str
    prompts: list[str | list[int]] | None  # completions: one entry per prompt
    messages: list[dict] | None
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    n: int = 1
    best_of: int = 1  # candidates generated per prompt (>= n; chat: n)
    max_tokens_field: str | None = None  # the max_tokens field the client set, if any


def _logit_bias(body: dict) -> dict[int, float]:
    bias = _field(body, "logit_bias", dict, {}, "an object mapping token ids to numbers")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise APIError(
                400, f"'logit_bias' keys must be token ids, got {key!r}.", "logit_bias"
            ) from None
        if isinstance(value, bool) or not isinstance(value, _NUM):
            raise APIError(400, f"'logit_bias[{key}]' must be a number.", "logit_bias")
        out[token] = float(value)
    return out


def _stop(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings.", "stop")
    return stop


def _common(
    body: dict, max_tokens_default, logprobs, prompt_logprobs=None, allow_zero=False
) -> tuple[SamplingParams, bool, bool, int, str | None]:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_body")
    n = _field(body, "n", int, 1)
    if not 1 <= n <= N_MAX:
        raise APIError(400, f"'n' must be an int in [1, {N_MAX}], got {n}.", "n")
    stop_ids = _field(body, "stop_token_ids", list, [], "a list of ints")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of ints.", "stop_token_ids")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field({name: max_tokens}, name, int, max_tokens_default)
    if max_tokens == 0 and not allow_zero:
        raise APIError(
            400, f"'{name}' must be an int > 0 (0 only with echo on /v1/completions).", name
        )
    if max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0  # the engine generates nothing only for a scored prompt
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    seed = _field(body, "seed", int, None)
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 1 << 30,
            temperature=float(_field(body, "temperature", _NUM, 1.0, "a number")),
            top_p=float(_field(body, "top_p", _NUM, 1.0, "a number")),
            top_k=_field(body, "top_k", int, 0),
            min_p=float(_field(body, "min_p", _NUM, 0.0, "a number")),
            seed=seed,
            stop=_stop(body),
            stop_token_ids=stop_ids,
            ignore_eos=_field(body, "ignore_eos", bool, False),
            logprobs=logprobs,
            presence_penalty=float(_field(body, "presence_penalty", _NUM, 0.0, "a number")),
            frequency_penalty=float(_field(body, "frequency_penalty", _NUM, 0.0, "a number")),
            prompt_logprobs=prompt_logprobs,
            logit_bias=_logit_bias(body),
        )
    except SamplingError as err:
        param = name if err.field == "max_tokens" else err.field
        message = str(err).replace("'max_tokens'", f"'{param}'")
        raise APIError(400, message.replace("with prompt_logprobs", "with echo"), param) from None
    return sampling, stream, include_usage, n, (name if max_tokens is not None else None)


def _is_ids(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def parse_completion(body) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_body")
    model = _field(body, "model", str)
    prompt = _field(body, "prompt", (str, list), what="a string or a list of token ids")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(
            400,
            "'prompt' must be a string, a list of token ids, or a non-empty list of either.",
            "prompt",
        )
    logprobs = _field(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise APIError(400, "'logprobs' must be an int in [0, 5] or null.", "logprobs")
    echo = _field(body, "echo", bool, False)
    prompt_logprobs = logprobs if echo else None
    sampling, stream, usage, n, given = _common(
        body, 16, logprobs, prompt_logprobs, allow_zero=echo
    )
    best_of = _field(body, "best_of", int, n)
    if not n <= best_of <= N_MAX:
        raise APIError(
            400, f"'best_of' must be an int in [n={n}, {N_MAX}], got {best_of}.", "best_of"
        )
    if best_of > n and stream:
        raise APIError(400, "'best_of' > n cannot be used with 'stream'.", "best_of")
    return ParsedRequest(
        model, prompts, None, sampling, stream, usage, echo, n, best_of, max_tokens_field=given
    )


def parse_messages(body: dict) -> list[dict]:
    """The chat `messages` of a body, checked and with content parts joined into strings."""
    messages = _field(body, "messages", list, what="a list of {role, content} objects")
    if not messages:
        raise APIError(400, "'messages' must hold at least one message.", "messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"'{where}' must be an object with a string 'role'.", where)
        if m["role"] not in CHAT_ROLES:
            raise APIError(
                400,
                f"'{where}.role' is {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}.",
                f"{where}.role",
            )
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"'{where}.content' parts must be of type 'text'.", where)
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string.", f"{where}.content")
        clean.append({"role": m["role"], "content": content})
    return clean


def parse_chat(body) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_body")
    model = _field(body, "model", str)
    clean = parse_messages(body)
    top = _field(body, "top_logprobs", int, None)
    if top is not None and not 0 <= top <= TOP_LOGPROBS_MAX:
        raise APIError(
            400, f"'top_logprobs' must be an int in [0, {TOP_LOGPROBS_MAX}].", "top_logprobs"
        )
    want = _field(body, "logprobs", bool, False)
    if body.get("echo"):
        raise APIError(400, "'echo' is supported on /v1/completions only.", "echo")
    sampling, stream, usage, n, given = _common(body, None, (top or 0) if want else None)
    return ParsedRequest(
        model, None, clean, sampling, stream, usage, n=n, best_of=n, max_tokens_field=given
    )


def parse_tokenize(body) -> tuple[str | None, list[dict] | None]:
    """`/tokenize`: (prompt, None) or (None, messages)."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_body")
    if "prompt" in body:
        return _field(body, "prompt", str), None
    if "messages" in body:
        return None, parse_messages(body)
    raise APIError(400, "'prompt' (a string) or 'messages' is required.", "prompt", "missing_field")


def parse_detokenize(body, vocab_size: int) -> list[int]:
    """`/detokenize`: the token ids, each in [0, vocab_size)."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_body")
    tokens = _field(body, "tokens", list, what="a list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise APIError(400, "'tokens' must be a list of ints.", "tokens")
    if any(not 0 <= t < vocab_size for t in tokens):
        raise APIError(
            400, f"'tokens' holds ids outside the vocabulary [0, {vocab_size}).", "tokens"
        )
    return tokens


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_logprobs(tokenizer, events, offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        if ev.token_id is None:
            continue
        tokens.append(tokenizer.decode([ev.token_id]))
        lps.append(ev.logprob)
        tops.append({tokenizer.decode([i]): lp for i, lp in ev.top_logprobs or []})
        offsets.append(offset)
        offset += len(ev.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(tokenizer, ids, req, n: int | None) -> dict:
    """The prompt part of an echoed completion's logprobs object (tokens from `ids`, scores from
    the request's `prompt_logprobs`); `n` alternatives per token."""
    tokens, offsets, offset = [], [], 0
    for i in ids:
        text = tokenizer.decode([i])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    tops = [
        None if top is None else {tokenizer.decode([i]): lp for i, lp in top[:n]}
        for top in req.prompt_top_logprobs
    ]
    return {
        "tokens": tokens,
        "token_logprobs": list(req.prompt_logprobs),
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def join_logprobs(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(tokenizer, events) -> dict:
    def entry(token_id, lp):
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = []
    for ev in events:
        if ev.token_id is None:
            continue
        item = entry(ev.token_id, ev.logprob)
        item["top_logprobs"] = [entry(i, lp) for i, lp in ev.top_logprobs or []]
        content.append(item)
    return {"content": content}


def _envelope(rid, model, obj: str, choices: list[dict], usage: dict | None = None) -> dict:
    """The OpenAI response object around its choices (usage only where the API sends it)."""
    body = {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def completion_choice(index, text, finish, logprobs) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index, text, finish, logprobs) -> dict:
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid, model, choices: list[dict], use) -> dict:
    return _envelope(rid, model, "text_completion", choices, use)


def chat_body(rid, model, choices: list[dict], use) -> dict:
    return _envelope(rid, model, "chat.completion", choices, use)


def completion_chunk(rid, model, text, finish=None, logprobs=None, index: int = 0) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return _envelope(rid, model, "text_completion", [choice])


def chat_chunk(rid, model, delta: dict, finish=None, logprobs=None, index: int = 0) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _envelope(rid, model, "chat.completion.chunk", [choice])
