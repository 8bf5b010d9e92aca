"""CLI command of this stage: ``masksae harvest`` (built on first use by masksae.cli).

Its flags are generated from :class:`masksae.harvest.config.HarvestConfig` (one flag per
field, masksae.cli_config); ``--config FILE.toml`` holds the same keys.
"""

from __future__ import annotations

from typing import Any

import typer

from masksae.cli_utils import user_errors

HELP = """Run the LLM on a masked corpus and cache the residual stream after block --layer.

--corruption chooses a control instead of masking (random tokens, deletion, noise).
Special tokens, position 0 and norm outliers (--outlier-norm-factor) are flagged excluded.

--devices cuda:0,cuda:1 splits the chunks over one rank per device; several nodes:
torchrun --nnodes M --nproc-per-node N -m masksae harvest ... (or accelerate launch).

Every flag is a key of a --config TOML file (flags win). Rerunning the same command
resumes an interrupted harvest.
"""

#: older flag names kept working
ALIASES = {"storage_options": ("--storage-option",)}


def register(app: typer.Typer) -> None:
    """Nothing to add: ``harvest`` is built lazily (masksae.cli.LAZY_COMMANDS)."""


def harvest_command() -> Any:
    """The ``masksae harvest`` command, its flags generated from HarvestConfig."""
    from masksae.cli_config import build_command, common_options, dataclass_parameters
    from masksae.harvest.config import HarvestConfig

    generated = dataclass_parameters(HarvestConfig(), aliases=ALIASES)
    return build_command("harvest", HELP, common_options(), generated, _run)


def load_harvest_config(config: str | None, overrides: dict[str, Any]) -> Any:
    """HarvestConfig from defaults < the TOML file ``config`` < ``overrides`` (flags)."""
    from masksae.config import deep_merge, load_toml, merge_into
    from masksae.harvest.config import HarvestConfig

    data = deep_merge(load_toml(config) if config else {}, overrides)
    return merge_into(HarvestConfig(), data, where=config or "harvest flags")


@user_errors
def _run(ctx: typer.Context, own: dict[str, Any], overrides: dict[str, Any]) -> None:
    import dataclasses

    from masksae.config import dumps_toml, to_dict
    from masksae.errors import ConfigError

    cfg = load_harvest_config(own["config"], overrides)
    if own["print_config"]:
        typer.echo(dumps_toml(to_dict(cfg)), nl=False)
        return
    if not cfg.out:
        raise ConfigError(
            "no output store given: pass --out DIR_OR_URL (or out = ... in the --config file)"
        )
    if cfg.devices:
        from masksae.harvest.parallel import parse_devices

        cfg = dataclasses.replace(cfg, devices=parse_devices(cfg.devices))
    from masksae.harvest.runner import run_harvest

    run_harvest(cfg, progress=own["progress"])  # logs its own one-line summary
