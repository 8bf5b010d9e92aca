"""The package surface: `import masksae` and the CLI import no torch; the notebook API
(``masksae.harvest/train/evaluate/open_store/load_sae``, ``ActivationStore(path)``); log
lines stay off progress bars; ``python -m masksae``."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "zarr", "sklearn", "pandas", "datasets", "numpy")


@pytest.mark.parametrize("statement", ["import masksae.cli", "import masksae"])
def test_cli_and_package_import_no_heavy_module(statement):
    code = f"import sys; {statement}; print(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert not [m for m in HEAVY if m in loaded]


# What the help of each generated command must list (proof it was built, not skipped)
GENERATED_HELP = {"train": "--sae.group-fractions", "harvest": "--layer", "evaluate": "--metrics"}
HELP_MODULES_SCRIPT = """
import json, sys
from masksae.cli import app
sys.argv = ["masksae", *sys.argv[1:]]
try:
    app()
except SystemExit:
    pass
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("command", sorted(GENERATED_HELP))
def test_generated_command_help_imports_no_torch(command):
    # train/harvest/evaluate build their flags from config dataclasses: those must stay
    # importable without torch (masksae.train.sae_config, masksae.evaluate.config)
    out = subprocess.run(
        [sys.executable, "-c", HELP_MODULES_SCRIPT, command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    help_text, _, modules = out.rpartition("MODULES=")
    assert GENERATED_HELP[command] in help_text
    loaded = set(json.loads(modules))
    assert not [m for m in ("torch", "transformers", "sklearn", "zarr") if m in loaded]


def test_help_runs_as_module_and_lists_commands():
    res = subprocess.run(
        [sys.executable, "-m", "masksae", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("harvest", "train", "evaluate", "report", "store"):
        assert command in res.stdout


def test_api_names_resolve_lazily():
    import masksae
    import masksae.api

    assert {"open_store", "load_sae", "harvest", "train", "evaluate", "ActivationStore"} <= set(
        masksae.__all__
    )
    assert masksae.open_store is masksae.api.open_store
    assert masksae.load_sae is masksae.api.load_sae
    # the stage packages are callable: their call runs the API function of the same name
    for name in ("harvest", "train", "evaluate"):
        assert callable(getattr(masksae, name))
    with pytest.raises(AttributeError):
        masksae.no_such_name  # noqa: B018


def test_api_rejects_config_and_fields_together_and_unknown_fields():
    import masksae
    from masksae.errors import ConfigError
    from masksae.harvest import HarvestConfig

    with pytest.raises(ConfigError, match="not both"):
        masksae.harvest(HarvestConfig(out="x"), tokens=5)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['tokenz'\]"):
        masksae.harvest(out="x", tokenz=5)
    with pytest.raises(ConfigError, match="no SAE given"):
        masksae.train("store", "runs", steps=3)


def test_log_lines_are_written_above_progress_bars(capsys):
    from tqdm import tqdm

    from masksae.logging_utils import TqdmLoggingHandler

    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("masksae.test_api_redirect")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=10, desc="work", file=sys.stderr) as bar:
            bar.update(3)
            logger.warning("a log line")
            bar.update(3)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    # the line starts a fresh line (the bar is cleared first), never glued after "work: 30%"
    assert any(part == "masksae.test_api_redirect: a log line" for part in re.split(r"[\r\n]", err))


def test_evaluate_loads_hub_models_at_the_recorded_commit(tmp_path):
    from masksae.evaluate.runner import _hub_commit

    sha = "0123456789abcdef0123456789abcdef01234567"
    assert _hub_commit("EleutherAI/pythia-70m-deduped", sha) == sha
    assert _hub_commit("EleutherAI/pythia-70m-deduped", "hub:EleutherAI/pythia-70m") is None
    assert _hub_commit("bundled:smollm2-135m", sha) is None
    assert _hub_commit(str(tmp_path), sha) is None  # a local folder has one version
    assert _hub_commit(None, sha) is None


def test_result_provenance_reads_the_harvest_model_revision():
    """Stores record the model's revision as ``model_revision``: results (and the evaluation
    caches keyed on it) must carry it, not None."""
    from masksae.evaluate.schema import provenance_from_meta

    meta = {"store": {"model": "m", "model_revision": "local:abc", "layer": 1}, "sae": {}}
    assert provenance_from_meta(meta)["revision"] == "local:abc"
    assert provenance_from_meta({"store": {"revision": "r0"}})["revision"] == "r0"
