"""The ``masksae`` command line: harvest | train | export | evaluate | report | study | store |
tasks | config.

Each stage owns its commands in ``masksae.<stage>.commands`` and registers them here, so
``masksae --help`` stays fast (heavy imports happen inside the commands). ``harvest``,
``train`` and ``evaluate`` have their flags generated from their config dataclasses
(masksae.cli_config), so they are built only when invoked (``LAZY_COMMANDS``).

Conventions of every command: ``-v/--verbose`` (debug logging, also accepted after the
subcommand), ``--out`` for what a command writes, ``--store`` for the store a command reads
(the ``store`` commands take it as their argument), ``--progress/--no-progress`` on long
work, ``--json`` where a listing or a check has machine-readable output.
"""

from __future__ import annotations

import importlib
import os

from masksae.allocator import keep_freed_memory
from masksae.threads import apply_thread_env_defaults

# OpenMP's wait policy must be in the environment before torch (and its OpenMP runtime) is
# imported: idle workers sleep instead of spinning on a shared machine (masksae.threads).
apply_thread_env_defaults()
# CPU forwards reuse their freed temporaries instead of re-faulting them (masksae.allocator)
keep_freed_memory()
# Plain click help: with this many options, typer's rich tables truncate option names and
# defaults at 80 columns. Users can still opt in with TYPER_USE_RICH=1.
os.environ.setdefault("TYPER_USE_RICH", "0")

from typing import Any  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from masksae import __version__  # noqa: E402
from masksae.logging_utils import setup_logging  # noqa: E402

#: commands built on first use: name -> ("module:function" returning a click.Command, the
#: one-line summary shown by ``masksae --help`` without building them)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "harvest": (
        "masksae.harvest.commands:harvest_command",
        "Run the LLM on a masked corpus and cache the residual stream of one layer in an "
        "activation store.",
    ),
    "train": (
        "masksae.train.commands:train_command",
        "Train one SAE or a sweep of SAEs on an activation store (one pass for all of them).",
    ),
    "evaluate": (
        "masksae.evaluate.commands:evaluate_command",
        "Score checkpoints (core, absorption, co-occurrence, probing metrics) into one "
        "result JSON per checkpoint.",
    ),
}
#: order of ``masksae --help`` (the pipeline first); commands not listed follow
COMMAND_ORDER = (
    "harvest",
    "train",
    "export",
    "evaluate",
    "report",
    "study",
    "store",
    "tasks",
    "config",
)


def _verbose_callback(value: bool) -> None:
    if value:
        setup_logging(True)


def _verbose_param() -> Any:
    """A ``-v/--verbose`` option object that turns debug logging on (not passed on)."""

    def probe(
        verbose: bool = typer.Option(
            False,
            "-v",
            "--verbose",
            callback=_verbose_callback,
            expose_value=False,
            help="Debug logging.",
        ),
    ) -> None:
        """-"""

    sub = typer.Typer(add_completion=False)
    sub.command()(probe)
    return next(p for p in typer.main.get_command(sub).params if p.name == "verbose")


def tidy_command(command: Any, verbose: Any) -> None:
    """Give ``command`` (and every subcommand of a group) ``-v/--verbose``, and help without
    Python type names (``<list[Path]>``: arguments show their metavar, options INT/TEXT)."""
    if not any("--verbose" in getattr(p, "opts", ()) for p in command.params):
        help_index = next(
            (i for i, p in enumerate(command.params) if "--help" in getattr(p, "opts", ())),
            len(command.params),
        )
        command.params.insert(help_index, verbose)
    for param in command.params:
        if param is not verbose and hasattr(param, "display_type_rich"):
            param.display_type_rich = _plain_type(param)
        if type(param).__name__.endswith("Argument") and hasattr(param, "_usage_display_name"):
            # usage lines in the click convention: STORE, [CHECKPOINT]... (not {store})
            name = (param.metavar or param.name or "ARG").upper()
            many = "..." if param.nargs != 1 else ""
            usage = (name if param.required else f"[{name}]") + many
            param._usage_display_name = lambda usage=usage: usage
            param._rich_display_name = lambda name=name, many=many: name + many
    for sub in getattr(command, "commands", {}).values():
        tidy_command(sub, verbose)


#: typer's type labels -> metavars
_PLAIN_TYPES = {"str": "TEXT", "int": "INT", "float": "FLOAT", "path": "PATH", "Path": "PATH"}


def _plain_type(param: Any) -> Any:
    original = param.display_type_rich
    is_argument = type(param).__name__.endswith("Argument")

    def display(ctx: Any) -> str | None:
        if is_argument:
            return None  # the metavar names it
        label = original(ctx)
        if not label or not label.startswith("<"):
            return label
        inner = label.strip("<>.").removeprefix("list[").rstrip("]")
        return _PLAIN_TYPES.get(inner, inner.upper())

    return display


def summary_line(command: Any) -> str:
    """The first paragraph of a command's help on one line (never cut short)."""
    text = command.short_help or (command.help or "").split("\n\n")[0]
    return " ".join(text.split())


class MasksaeGroup(TyperGroup):
    """The top-level group: lazy config commands, -v everywhere, full summaries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._verbose = _verbose_param()
        for command in self.commands.values():
            tidy_command(command, self._verbose)

    def list_commands(self, ctx: Any) -> list[str]:
        names = set(super().list_commands(ctx)) | set(LAZY_COMMANDS)
        ordered = [n for n in COMMAND_ORDER if n in names]
        return ordered + sorted(names - set(ordered))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module_name, function = LAZY_COMMANDS[cmd_name][0].split(":")
            command = getattr(importlib.import_module(module_name), function)()
            tidy_command(command, self._verbose)
            self.commands[cmd_name] = command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name][1]))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, summary_line(command)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="masksae",
    cls=MasksaeGroup,
    help="Harvest masked LLM activations, train sparse autoencoders on them, and score them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# modules exposing ``register(app: typer.Typer) -> None``
STAGE_COMMAND_MODULES: tuple[str, ...] = (
    "masksae.storage.commands",
    "masksae.train.commands",
    "masksae.evaluate.commands",
    "masksae.study.commands",
    "masksae.config_commands",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"masksae {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """masksae: masked-regularization SAEs from activation harvest to report."""
    setup_logging(verbose)


for _module in STAGE_COMMAND_MODULES:
    importlib.import_module(_module).register(app)

if __name__ == "__main__":
    app()
