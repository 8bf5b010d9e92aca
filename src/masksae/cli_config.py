"""Command-line flags generated from the typed config dataclasses.

``harvest``, ``train`` and ``evaluate`` share one model: the stage's config dataclass is the
single source of truth, a ``--config FILE.toml`` holds any of its fields, and every field is
also a flag. Precedence: the dataclass default < the command's own base (e.g. evaluate's
"demo" probing preset) < the config file < the flags.

Flag names are the field's dotted path in the config file with dashes: a top-level key
``batch_size`` is ``--batch-size``, the key ``warmup_steps`` of the ``[train]`` table is
``--train.warmup-steps``. Booleans are ``--x/--no-x`` (``--train.fused/--train.no-fused``);
lists take comma-separated values (or repeat the flag); tables of strings (storage options)
take ``KEY=VALUE`` (repeatable). The field's docstring is the flag's help and its default is
shown. Older short names stay as aliases (``--steps`` for ``--train.steps``).

The flags are typer options of a generated function signature (typer builds click-like
commands from signatures); the commands are built on first use (``masksae.cli``), so
``masksae --help`` imports none of the configs.
"""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import typer

from masksae.config import field_docs, set_dotted
from masksae.errors import ConfigError

PREFIX = "cfg__"
"""Parameter names of generated flags start with this (``cfg__train__warmup_steps``)."""


def flag_name(path: Sequence[str]) -> str:
    """``("train", "warmup_steps")`` -> ``--train.warmup-steps``."""
    return "--" + ".".join(part.replace("_", "-") for part in path)


def _negated(path: Sequence[str]) -> str:
    parts = [p.replace("_", "-") for p in path]
    return "--" + ".".join([*parts[:-1], "no-" + parts[-1]])


def _unwrap_optional(annotation: Any) -> Any:
    """The annotation without its None member (``int | None`` -> int)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return annotation


def _sequence_items(annotation: Any) -> Any | None:
    """The element type of a list/tuple annotation (None when not a sequence)."""
    inner = _unwrap_optional(annotation)
    if typing.get_origin(inner) in (list, tuple):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _is_mapping(annotation: Any) -> bool:
    inner = _unwrap_optional(annotation)
    return inner is dict or typing.get_origin(inner) is dict


def _metavar(annotation: Any) -> str:
    return {int: "INT", float: "FLOAT"}.get(_unwrap_optional(annotation), "TEXT")


@dataclasses.dataclass
class FieldFlag:
    """One generated flag: the config path it sets and how its text becomes a value."""

    path: tuple[str, ...]
    """Dotted path of the key in the config file, e.g. ("train", "warmup_steps")."""
    annotation: Any
    """The field's type."""
    split: bool = True
    """Split list values on commas (False for lists of free text such as record filters,
    declared by the field's ``metadata={"cli_split": False}``)."""

    @property
    def param_name(self) -> str:
        return PREFIX + "__".join(self.path)

    def config_value(self, raw: Any) -> Any:
        """The parsed flag as the value the config file would hold."""
        items = _sequence_items(self.annotation)
        if items is not None:
            out: list[Any] = []
            for text in raw:
                if self.split:
                    out += split_list(str(text), items, flag_name(self.path))
                else:
                    out.append(str(text))
            return out
        if _is_mapping(self.annotation):
            from masksae.storage.location import parse_storage_options

            return parse_storage_options(raw)  # KEY=VALUE, JSON values decoded
        return raw


def split_list(text: str, items: Any, flag: str) -> list[Any]:
    """``"20,40"`` or ``"[20, 40]"`` -> [20, 40] (numbers converted for numeric lists)."""
    if text.strip().startswith("["):
        try:
            return list(tomllib.loads(f"v = {text}")["v"])
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{flag} {text!r} is not a TOML list: {exc}") from None
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        return []  # "" or ",": an empty list (the config then says what it needs)
    if not all(parts):
        raise ConfigError(
            f"{flag} {text!r} has an empty item: expected comma-separated values, e.g. {flag} a,b"
        )
    kind = _unwrap_optional(items)
    if kind not in (int, float):
        return parts
    try:
        return [kind(p.replace("_", "")) for p in parts]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected comma-separated {_metavar(kind).lower()}s, e.g. "
            f"{flag} 20,40"
        ) from None


def _clean_help(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def field_parameter(
    path: tuple[str, ...],
    annotation: Any,
    default: Any,
    help_text: str,
    aliases: Sequence[str] = (),
    split: bool = True,
) -> tuple[inspect.Parameter, FieldFlag]:
    """The typer parameter of one config field (conventions: the module docstring)."""
    flag = FieldFlag(path, annotation, split)
    inner = _unwrap_optional(annotation)
    shown = default not in (None, "", (), [], {})
    common: dict[str, Any] = {"help": _clean_help(help_text), "show_default": shown}
    if inner is bool:
        decls = [f"{flag_name(path)}/{_negated(path)}"]
        decls += [a if "/" in a else f"{a}/--no-{a[2:]}" for a in aliases]
        option = typer.Option(bool(default), *decls, **common)
        kind: Any = bool
    elif _sequence_items(annotation) is not None:
        items = _sequence_items(annotation)
        value = [",".join(str(v) for v in default)] if default else None
        meta = _metavar(items) + (",..." if split else "")
        option = typer.Option(value, flag_name(path), *aliases, metavar=meta, **common)
        kind = list[str] | None
    elif _is_mapping(annotation):
        option = typer.Option(None, flag_name(path), *aliases, metavar="KEY=VALUE", **common)
        kind = list[str] | None
    else:
        kind = {int: int, float: float}.get(inner, str) | None
        option = typer.Option(
            default, flag_name(path), *aliases, metavar=_metavar(annotation), **common
        )
    param = inspect.Parameter(
        flag.param_name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind
    )
    return param, flag


def dataclass_parameters(
    base: Any,
    *,
    prefix: tuple[str, ...] = (),
    aliases: dict[str, Sequence[str]] | None = None,
    exclude: Iterable[str] = (),
    as_text: Iterable[str] = (),
) -> list[tuple[inspect.Parameter, FieldFlag]]:
    """One flag per field of the dataclass instance ``base`` (its values are the defaults
    shown), recursing into fields that hold a dataclass instance (a nested table).
    ``as_text`` names fields whose flag takes free text (a hook turns it into the value,
    e.g. a preset name)."""
    aliases = aliases or {}
    skip = set(exclude)
    text = set(as_text)
    hints = typing.get_type_hints(type(base))
    docs = field_docs(type(base))
    out: list[tuple[inspect.Parameter, FieldFlag]] = []
    for f in dataclasses.fields(base):
        path = (*prefix, f.name)
        dotted = ".".join(path)
        if not f.init or dotted in skip:
            continue
        value = getattr(base, f.name)
        if dataclasses.is_dataclass(value):
            out += dataclass_parameters(
                value, prefix=path, aliases=aliases, exclude=skip, as_text=text
            )
            continue
        out.append(
            field_parameter(
                path,
                str if dotted in text else hints[f.name],
                value,
                docs.get(f.name, ""),
                aliases.get(dotted, ()),
                split=f.metadata.get("cli_split", True),
            )
        )
    return out


def given_overrides(
    ctx: typer.Context, flags: Iterable[FieldFlag], values: dict[str, Any]
) -> dict[str, Any]:
    """The generated flags given on the command line, as a nested dict like the config
    file's (flags not given are left out, so the file's values stand)."""
    out: dict[str, Any] = {}
    for flag in flags:
        source = ctx.get_parameter_source(flag.param_name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        set_dotted(out, flag.path, flag.config_value(values[flag.param_name]))
    return out


def build_command(
    name: str,
    help_text: str,
    own: list[inspect.Parameter],
    generated: list[tuple[inspect.Parameter, FieldFlag]],
    run: Callable[[typer.Context, dict[str, Any], dict[str, Any]], None],
) -> Any:
    """A typer command named ``name`` whose options are ``own`` (the command's hand-written
    parameters, e.g. --out) then the generated ``generated``. ``run(ctx, own_values,
    overrides)`` gets the own values and the given generated flags as a nested dict."""
    flags = [flag for _, flag in generated]

    from masksae.cli_utils import user_errors

    @user_errors
    def body(ctx: typer.Context, values: dict[str, Any]) -> None:
        own_values = {k: v for k, v in values.items() if not k.startswith(PREFIX)}
        run(ctx, own_values, given_overrides(ctx, flags, values))

    def callback(ctx: typer.Context, **values: Any) -> None:
        body(ctx, values)

    ctx_param = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    params = [ctx_param, *own, *(p for p, _ in generated)]
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__doc__ = help_text
    sub = typer.Typer(add_completion=False, rich_markup_mode=None)  # "[train]" is text
    sub.command(name, context_settings={"max_content_width": 100})(callback)
    command = typer.main.get_command(sub)
    command.parse_args = _one_line_unknown_options(command, command.parse_args)
    return command


def _one_line_unknown_options(command: Any, parse_args: Callable[..., Any]) -> Any:
    """``parse_args`` answering an unknown flag with one line naming the closest flag."""

    def parse(ctx: Any, args: list[str]) -> Any:
        try:
            return parse_args(ctx, args)
        except Exception as exc:
            if type(exc).__name__ != "NoSuchOption":
                raise
            from masksae.config import did_you_mean

            flags = [o for p in command.params for o in (*p.opts, *p.secondary_opts)]
            bad = str(getattr(exc, "option_name", "")) or str(exc)
            typer.echo(
                f"error: no such option {bad}{did_you_mean(bad, flags)}: masksae "
                f"{command.name} --help lists every flag",
                err=True,
            )
            raise typer.Exit(code=2) from None

    return parse


def own_option(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    """A hand-written parameter of a generated command (``--out``, ``--resume``, ...)."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def common_options() -> list[inspect.Parameter]:
    """--config, --print-config and --progress/--no-progress (every generated command)."""
    return [
        own_option(
            "config",
            str | None,
            typer.Option(
                None,
                "--config",
                metavar="FILE.toml",
                help="TOML file of this command's config fields: every flag below is a key "
                "(dots are tables). Flags override the file; `masksae config list` shows "
                "examples.",
            ),
        ),
        own_option(
            "print_config",
            bool,
            typer.Option(
                False,
                "--print-config",
                help="Print the merged config (defaults < --config file < flags) as TOML and "
                "exit; the output is a valid --config file.",
            ),
        ),
        own_option(
            "progress",
            bool,
            typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
        ),
    ]
