"""The probing metrics: SAEBench sparse probing, SCR and TPP, and Kantamneni et al.'s OOD
probing, on cached LLM activations of the registered tasks (:mod:`masksae.evaluate.tasks`).

One module per metric (``sparse_probing``, ``scr``, ``tpp``, ``ood``), each with
``run(sae, ctx) -> dict`` (the result section of that name), ``ctx`` being a
:class:`~masksae.evaluate.probing.suite.ProbingContext`. Settings live in
:class:`~masksae.evaluate.probing.config.ProbingConfig` (presets: :func:`probing_preset`).
This package's import is light (no torch): the report reads :mod:`.figures` only.
"""

from collections.abc import Callable
from typing import Any

from masksae.evaluate.probing.config import (
    PRESETS,
    OodConfig,
    ProbingConfig,
    ScrConfig,
    SparseProbingConfig,
    TppConfig,
    probing_preset,
    with_tasks,
)

METRIC_NAMES = ("sparse_probing", "scr", "tpp", "ood")


def metric_runner(name: str) -> Callable[[Any, Any], dict[str, Any]]:
    """``run(sae, ctx)`` of probing metric ``name``."""
    import importlib

    if name not in METRIC_NAMES:
        raise KeyError(name)
    return importlib.import_module(f"masksae.evaluate.probing.{name}").run


__all__ = [
    "METRIC_NAMES",
    "PRESETS",
    "OodConfig",
    "ProbingConfig",
    "ScrConfig",
    "SparseProbingConfig",
    "TppConfig",
    "metric_runner",
    "probing_preset",
    "with_tasks",
]
