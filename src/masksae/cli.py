"""The ``masksae`` command line: harvest | store | train | export | evaluate | report | study.

Each stage owns its commands in ``masksae.<stage>.commands`` and registers them here, so
``masksae --help`` stays fast (heavy imports happen inside the commands).
"""

from __future__ import annotations

import importlib
import os

from masksae.threads import apply_thread_env_defaults

# OpenMP's wait policy must be in the environment before torch (and its OpenMP runtime) is
# imported: idle workers sleep instead of spinning on a shared machine (masksae.threads).
apply_thread_env_defaults()
# Plain click help: with this many options, typer's rich tables truncate option names and
# defaults at 80 columns. Users can still opt in with TYPER_USE_RICH=1.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402

from masksae import __version__  # noqa: E402
from masksae.logging_utils import setup_logging  # noqa: E402

app = typer.Typer(
    name="masksae",
    help="Harvest masked LLM activations, train sparse autoencoders on them, and score them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# modules exposing ``register(app: typer.Typer) -> None``
STAGE_COMMAND_MODULES: tuple[str, ...] = (
    "masksae.storage.commands",
    "masksae.harvest.commands",
    "masksae.train.commands",
    "masksae.evaluate.commands",
    "masksae.study.commands",
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
