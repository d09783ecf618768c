"""Command-line flags generated from config dataclasses (TRL's ``HfArgumentParser`` idea, in 60 lines).

A field is one flag: ``--field-name``, typed from its annotation (``int``, ``float``, ``str``, ``bool``
-> ``--x/--no-x``, ``list[T]`` -> comma-separated, ``Literal[...]`` -> choices, ``X | None``), with its
``metadata={"help": ...}`` and its default. Validation lives in the dataclass's ``__post_init__``, so a
config built from Python and one built from flags are checked the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return tp


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def add_config_args(
    parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = (), positional: tuple[str, ...] = ()
) -> None:
    """One flag per field of ``cls`` (``positional`` fields become positional arguments). A flag that the
    parser already has (two policy backends that both take ``--model``) gets the second help appended."""
    hints = typing.get_type_hints(cls)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if f.name in actions:
            action = actions[f.name]
            if help_text and help_text not in (action.help or ""):
                head, sep, default_note = (action.help or "").partition(" (default: ")
                action.help = f"{head}; {help_text}" + (sep + default_note if sep else "")
            continue
        tp, default = _unwrap_optional(hints[f.name]), _default(f)
        kw: dict[str, Any] = {"help": help_text}
        if typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif typing.get_origin(tp) is list:
            item = (typing.get_args(tp) or (str,))[0]
            kw["type"] = lambda s, item=item: [item(x.strip()) for x in s.split(",") if x.strip()]
            kw["metavar"] = "A,B,..."
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp
        if f.name in positional:
            kw.pop("action", None)
            parser.add_argument(f.name, **kw)
            continue
        if default not in (None, "", [], False):
            kw["help"] = f"{help_text} (default: {_shown(default)})".strip()
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass built from the parsed flags (its ``__post_init__`` validates)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**(values | overrides))
