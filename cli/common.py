"""What the command groups share: flags made from a config's fields, and offline error handling.

A config is a dataclass (a field's docstring is its `--help`) or a pydantic model (its
`description`). Each field becomes `--field-name` with the field's type and default:
`bool` a switch (`--no-field-name` when it defaults to True), `Literal` a choice, `list`
a repeated flag, a field without a default a required flag. Field metadata (dataclass
`metadata`, pydantic `json_schema_extra`) can set `positional`, `flag` and `metavar`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable
from dataclasses import MISSING
from types import NoneType, UnionType
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ConfigField:
    name: str
    type: Any  # the resolved annotation
    default: Any  # MISSING: required
    help: str
    positional: bool = False
    flag: str | None = None
    metavar: str | None = None


def _attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated attribute of a class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_fields(cls: type) -> list[ConfigField]:
    if dataclasses.is_dataclass(cls):
        hints, docs = typing.get_type_hints(cls), _attribute_docs(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out.append(ConfigField(f.name, hints[f.name], default, docs.get(f.name, ""), **f.metadata))
        return out
    out = []  # a pydantic model
    for name, f in cls.model_fields.items():
        default = MISSING if f.is_required() else f.get_default(call_default_factory=True)
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        out.append(ConfigField(name, f.annotation, default, f.description or "", **extra))
    return out


def _without_none(t: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(t) in (UnionType, typing.Union):
        args = [a for a in get_args(t) if a is not NoneType]
        if len(args) == 1:
            return args[0]
    return t


def _add(parser: argparse.ArgumentParser, f: ConfigField) -> None:
    kw: dict[str, Any] = {"help": f.help.replace("%", "%%")}
    if f.metavar:
        kw["metavar"] = f.metavar
    t = _without_none(f.type)
    if f.positional:
        if get_origin(t) is list:  # everything left, e.g. after `--`
            parser.add_argument(f.name, type=get_args(t)[0], nargs="*", default=[], **kw)
        else:
            parser.add_argument(f.name, type=t, **kw)
        return
    flag = f.flag or "--" + f.name.replace("_", "-")
    if t is bool:
        if f.default is True:
            parser.add_argument("--no-" + flag.removeprefix("--"), dest=f.name, action="store_false", **kw)
        else:
            parser.add_argument(flag, dest=f.name, action="store_true", **kw)
        return
    if get_origin(t) is Literal:
        kw["choices"] = list(get_args(t))
        t = type(kw["choices"][0])
    elif get_origin(t) is list:
        kw["action"] = "append"
        t = get_args(t)[0]
    if f.default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
        if f.default not in (None, "", []) and "default" not in f.help:
            kw["help"] += f" (default: {f.default})".replace("%", "%%")
    parser.add_argument(flag, dest=f.name, type=t, **kw)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of the config class `cls`."""
    for f in config_fields(cls):
        _add(parser, f)


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of `cls`'s fields in parsed `args` (made by `add_config_arguments`)."""
    return {f.name: getattr(args, f.name) for f in config_fields(cls)}


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` from parsed `args`; a value it refuses (ValueError) exits with the message."""
    try:
        return cls(**config_values(cls, args))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def summary(cls: type) -> str:
    """The first line of a config's docstring, without its full stop: a subcommand's one-line help."""
    return (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")


def offline(cmd: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """An offline command: a RudderError (bad config, artifact, input) exits with its message."""

    def wrapped(args: argparse.Namespace) -> int:
        from rudder.core.errors import RudderError

        try:
            return cmd(args) or 0
        except RudderError as e:
            raise SystemExit(f"error: {e}") from None

    return wrapped
