"""Check settings against the type annotations of the dataclass or function they are for.

A recipe's YAML or a file's manifest can put a word where a number belongs (``lr: fast``),
``true`` where an integer belongs (a bool is an ``int`` to Python; here it is not), or a list
where a mapping belongs. :func:`check_fields` and :func:`check_value` turn each such value into
one :class:`~cnnpress.errors.ConfigError` that names the setting, the value and the type it
needs, before the value reaches code that would fail on it with a ``TypeError``.

The annotations understood: ``bool``, ``int``, ``float`` (an int is a number too; NaN and
infinities are refused), ``str``, ``None``, unions of these, ``dict[K, V]``, ``list[T]``,
``tuple[T, ...]`` and ``Any``. Anything else is not judged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from cnnpress.errors import ConfigError

__all__ = ["check_arguments", "check_fields", "check_value", "describe", "matches"]


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the annotated type ``tp`` (bools are not ints or numbers)."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        key, item = args if len(args) == 2 else (Any, Any)
        return all(matches(k, key) and matches(v, item) for k, v in value.items())
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args else Any
        return all(matches(v, item) for v in value)
    return True


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def describe(tp: Any) -> str:
    """What a value of type ``tp`` is, in words ("an integer", "true, false or null")."""
    if tp is None or tp is type(None):
        return "null"
    if tp in _NAMES:
        return _NAMES[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        words = [describe(a) for a in args]
        if bool in args:  # "true or false" joins the list as two words
            words = [w for a, w in zip(args, words, strict=True) if a is not bool]
            words = ["true", "false", *words]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if tp is dict or origin is dict:
        if len(args) == 2 and args[1] is not Any:
            return f"a mapping of names to {_plural(args[1])}"
        return "a mapping (name: value)"
    if tp in (list, tuple) or origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args and args[0] is not Any else "a list"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    word = describe(tp)
    for article in ("an ", "a "):
        if word.startswith(article):
            first, _, rest = word[len(article) :].partition(" ")
            return f"{first}s {rest}".rstrip()
    return word


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    names = {int: "an integer", float: "a decimal number", str: "a string", list: "a list"}
    names.update({tuple: "a list", dict: "a mapping"})
    return names.get(type(value), type(value).__name__)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_value(name: str, value: Any, tp: Any) -> None:
    """Raise one :class:`ConfigError` naming ``name``, ``value`` and ``tp`` if they disagree."""
    if not matches(value, tp):
        raise ConfigError(f"{name} must be {describe(tp)}, got {_shown(value)} ({_kind(value)})")


@functools.cache
def _hints(target: type | Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(target)


def check_fields(cls: type, values: dict[str, Any]) -> None:
    """Check each of ``values`` against the annotation of dataclass ``cls``'s field of its name.

    Names that are not fields are left to the caller (which reports unknown settings).
    """
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in values and field.name in hints:
            check_value(field.name, values[field.name], hints[field.name])


def check_arguments(func: Callable[..., Any], values: dict[str, Any]) -> None:
    """Check keyword arguments against the annotations of ``func``'s parameters."""
    hints = _hints(func)
    for name, value in values.items():
        if name in hints:
            check_value(name, value, hints[name])
