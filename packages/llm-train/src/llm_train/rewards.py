"""Reward functions for GRPO, and the loader for `reward_functions: ["module:function", ...]`.

Signature (TRL's): `fn(prompts: list[str], completions: list[str], **fields) -> list[float]`, one
reward per completion; `fields` holds every other field of the prompt records, one value per
completion (e.g. `answer`). Built-ins:
- `llm_train.rewards:exact_match_number`: 1.0 when the last number in the completion equals the
  record's `answer` (as a number), else 0.0;
- `llm_train.rewards:format_regex`: 1.0 when the completion matches `reward_format_regex`
  (re.search), else 0.0.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable

from llm_core import Config, ConfigError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match_number(prompts, completions, answer=None, **_) -> list[float]:
    if answer is None:
        raise ValueError("exact_match_number needs an 'answer' field in the prompt records")
    out = []
    for text, want in zip(completions, answer, strict=True):
        found = NUMBER.findall(text)
        try:
            out.append(float(bool(found) and float(found[-1]) == float(want)))
        except (TypeError, ValueError):
            out.append(0.0)
    return out


def format_regex(prompts, completions, *, pattern: str, **_) -> list[float]:
    regex = re.compile(pattern)
    return [float(regex.search(text) is not None) for text in completions]


def load_reward_functions(cfg: Config) -> list[tuple[str, Callable]]:
    """(name, callable) for every entry of `reward_functions`; ConfigError naming the entry when
    it does not import or is not callable."""
    out = []
    for spec in cfg.reward_functions:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"reward_functions entry {spec!r} must look like 'module:function'.")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward_functions entry {spec!r} does not import: {err}") from None
        if not callable(fn):
            raise ConfigError(f"reward_functions entry {spec!r} is not callable.")
        if fn is format_regex:
            if not cfg.reward_format_regex:
                raise ConfigError(f"{spec} needs reward_format_regex (the pattern to match).")
            fn = functools.partial(format_regex, pattern=cfg.reward_format_regex)
        out.append((attr, fn))
    return out
