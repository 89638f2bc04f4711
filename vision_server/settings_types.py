"""The Python values ``Settings(...)`` takes, checked against each field's declared type.

Flags, variables and config keys are text that :func:`vision_server.settings.coerce` turns into
typed values; a program that builds ``Settings`` itself (the engine without HTTP or the CLI) skips
that step. Without this check a wrong type surfaced late and far away: ``port="8080"`` as a
``TypeError`` from a comparison, ``cors_origins="http://a"`` as the origin ``'h'``. Here each value
is either turned into the declared type where the meaning is plain (one ``str`` for a tuple of
``str``, a list for a tuple, a ``str`` for a ``Path``, an ``int`` for a ``float``) or refused with
an error that names the field.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class WrongType(Exception):
    """A value is not of its field's type; the message lacks the field's name, which the caller adds."""


def _wrong(expected: str, value: Any) -> WrongType:
    return WrongType(f"expected {expected}, not {type(value).__name__} {value!r}")


def checked(hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` describes, or :class:`WrongType`."""
    if typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        try:
            return checked(inner, value)
        except WrongType:
            raise _wrong(f"{describe(inner)} or None", value) from None
    if typing.get_origin(hint) is tuple:
        return _tuple(hint, value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif isinstance(value, hint):
        return value
    raise _wrong(describe(hint), value)


def _tuple(hint: Any, value: Any) -> tuple[Any, ...]:
    """A ``tuple[X, ...]`` or fixed ``tuple[X, Y]`` from a tuple or list; one ``str`` for a tuple
    of ``str`` is a one-item tuple (not its characters), a mapping for a tuple of pairs its items."""
    args = typing.get_args(hint)
    variadic = len(args) == 2 and args[1] is Ellipsis
    if variadic and args[0] is str and isinstance(value, str):
        return (value,)
    if variadic and isinstance(value, Mapping) and typing.get_origin(args[0]) is tuple:
        value = list(value.items())
    if not isinstance(value, (tuple, list)):
        raise _wrong(describe(hint), value)
    kinds = [args[0]] * len(value) if variadic else list(args)
    if len(kinds) != len(value):
        raise _wrong(describe(hint), value)
    items = []
    for index, (kind, item) in enumerate(zip(kinds, value, strict=True)):
        try:
            items.append(checked(kind, item))
        except WrongType as exc:
            raise (WrongType(f"item {index}: {exc}") if variadic else _wrong(describe(hint), value)) from None
    return tuple(items)


def describe(hint: Any) -> str:
    """A type as a message names it: ``a tuple of str (or one str)``."""
    if typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType):
        return " or ".join("None" if arg is type(None) else describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            one = " (or one str)" if args[0] is str else ""
            return f"a tuple of {_short(args[0])}{one}"
        return "a tuple (" + ", ".join(_short(arg) for arg in args) + ")"
    return {
        bool: "True or False",
        int: "a whole number (int)",
        float: "a number (int or float)",
        str: "a str",
        Path: "a path (str or Path)",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def _short(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "(" + ", ".join(_short(arg) for arg in typing.get_args(hint)) + ") pairs"
    return getattr(hint, "__name__", str(hint))
