"""Coerce raw YAML / command-line values to the types declared on `Config`, or say what is wrong."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

from llm_core.config.schema import ConfigError


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is list:
        args = get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Return `value` as type `tp`; raise ConfigError naming `key`, the expected type and `source`."""
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise ConfigError(
            f"Config key '{key}' expects {type_name(tp)}, got {value!r} "
            f"({type(value).__name__}) from {source}."
        ) from None


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None):
                if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
                    return None
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item_tp,) = get_args(tp) or (Any,)
        return [v if item_tp is Any else _coerce(v, item_tp) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch
