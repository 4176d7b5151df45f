"""Command-line flags generated from dataclass fields, and the dataclasses built back from them.

A field becomes a flag when its metadata has ``help`` and no ``cli: False``. Its metadata may
also name the ``flag`` (default ``--field-name``), ``aliases``, ``choices`` (the constants of
``skipgpt.config`` / ``skipgpt.train``) and ``type`` (a name of ``common.ARG_TYPES``, checked by
argparse; default: the annotation's ``int``/``float``/``str``; a ``bool`` is a switch). The
flag's default is the field's default, so the dataclasses stay the one source of defaults::

    add_dataclass_args(group, LoopArgs, ["max_steps", "lr"])     # --max-steps, --lr
    loop = dataclass_from_args(LoopArgs, args)                    # LoopArgs(max_steps=..., lr=...)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .common import ARG_TYPES

__all__ = ["cli_fields", "flag_of", "dest_of", "add_dataclass_args", "dataclass_from_args"]

# annotation (a string: the dataclasses use `from __future__ import annotations`) -> argparse type
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field) -> str:
    """The main flag of field ``f``: ``metadata["flag"]`` or ``--`` + its name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest_of(f: dataclasses.Field) -> str:
    """The argparse dest of field ``f`` (from its main flag)."""
    return flag_of(f)[2:].replace("-", "_")


def _field(cls, name: str) -> dataclasses.Field:
    for f in cli_fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__}.{name} is not a command-line field")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    return ",".join(value) if isinstance(value, tuple) else value  # lists are given comma-separated


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls,
    fields: Iterable[str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    help: Mapping[str, str] | None = None,
) -> None:
    """Add a flag for each of ``fields`` (names; default: every command-line field) of ``cls``.

    ``defaults`` / ``help`` (field name -> value) replace a field's default or help for this
    command (e.g. stage 2's learning rate; a help given here is an argparse format string, so
    ``%`` is ``%%``). The help shows the default unless it says one.
    """
    chosen = [_field(cls, n) for n in fields] if fields is not None else cli_fields(cls)
    for f in chosen:
        meta = f.metadata
        default = (defaults or {}).get(f.name, _default(f))
        text = (help or {}).get(f.name, meta["help"].replace("%", "%%"))  # argparse formats help with %
        if "(default" not in text and default is not None and default is not False:
            text += " (default: %(default)s)"
        kwargs: dict[str, Any] = {"default": default, "help": text, "dest": dest_of(f)}
        if f.type == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = ARG_TYPES[meta["type"]] if "type" in meta else _TYPES.get(f.type, str)
            if "choices" in meta:
                kwargs["choices"] = list(meta["choices"])
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_of(f), *meta.get("aliases", ()), **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, *, base=None, **changes):
    """``cls`` from the parsed flags of its command-line fields; a field without a flag in
    ``args`` keeps ``base``'s value (default: the field's default); ``changes`` win over both."""
    values = dataclasses.asdict(base) if base is not None else {}
    given = vars(args)
    for f in cli_fields(cls):
        if dest_of(f) in given:
            values[f.name] = given[dest_of(f)]
    values.update(changes)
    return cls(**values)
