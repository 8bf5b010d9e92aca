"""Typed-config helpers shared by every stage.

Stage configs are plain dataclasses (one per stage, in that stage's ``config.py``), each
field documented by a docstring line under it. This module turns TOML tables and CLI
overrides into those dataclasses, refusing unknown keys with a message that lists the
valid ones.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from masksae.errors import ConfigError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce simple TOML values (lists to tuples, ints to floats) to the field type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit type {annotation}")
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming the valid ones."""
    where = where or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def did_you_mean(key: str, valid: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(data: dict[str, Any], valid: typing.Iterable[str], where: str) -> None:
    """ConfigError naming the unknown keys of ``data``, the closest valid one, and all of them."""
    valid = sorted(valid)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}{did_you_mean(unknown[0], valid)}; "
            f"valid keys are {valid}"
        )


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written as a string statement right under each annotated field of ``cls``
    and of its dataclass bases (the documentation of the configs: one source of truth)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def merge_into(base: T, data: dict[str, Any], where: str, hooks: dict[str, Any] | None = None) -> T:
    """A copy of the dataclass instance ``base`` with the values of the (nested) dict ``data``.

    A key whose field holds a dataclass takes a table, merged recursively, so only the keys
    given change; other values are coerced to the field's type. Unknown keys are a
    ConfigError naming the closest valid key. ``hooks`` maps dotted keys to functions applied
    to the raw value first (e.g. a preset name turned into a number). The result is built
    with ``dataclasses.replace``, so the dataclass validates it.
    """
    return _merge(base, data, where, (), hooks or {})


def _merge(base: Any, data: dict[str, Any], where: str, path: tuple[str, ...], hooks: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(base) if f.init}
    table = ".".join(path)
    check_keys(data, fields, f"{where} [{table}]" if table else where)
    hints = typing.get_type_hints(type(base))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        dotted = ".".join((*path, key))
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, where, (*path, key), hooks)
            continue
        if dotted in hooks:
            value = hooks[dotted](value)
        changes[key] = _coerce(value, hints[key], f"{where}: {dotted}")
    return dataclasses.replace(base, **changes)


def deep_merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``low`` updated by ``high``, tables merged key by key (``high`` wins)."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], path: typing.Sequence[str], value: Any) -> None:
    """``data[a][b][c] = value`` for path (a, b, c), creating the tables on the way."""
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML text of a nested dict: scalars and lists as values, dicts as tables; None values
    are left out (TOML has no null: a missing key takes the field's default)."""
    lines: list[str] = []
    _dump_table(data, (), lines)
    return "\n".join(lines).strip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum()
    return key if bare else json.dumps(key)


def _dump_table(data: dict[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if v is not None and not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines += ["", "[" + ".".join(_toml_key(p) for p in path) + "]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    for key, table in tables.items():
        _dump_table(table, (*path, key), lines)


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-friendly dict of a dataclass (tuples become lists, paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in dataclasses.asdict(obj).items()}
