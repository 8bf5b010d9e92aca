"""masksae: masked-regularization sparse autoencoders, from LLM activations to reports.

The notebook API (see README "Python API"), imported on first use so that ``import masksae``
stays light (no torch)::

    masksae.harvest(...), masksae.train(...), masksae.evaluate(...)
    masksae.open_store(path), masksae.load_sae(path), masksae.ActivationStore(path)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("masksae")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

# PEP 562 lazy exports: the functions live in masksae.api; the classes in their stages
_EXPORTS = {
    "open_store": "masksae.api",
    "load_sae": "masksae.api",
    "ActivationStore": "masksae.storage.reader",
    "HarvestConfig": "masksae.harvest.config",
    "TrainConfig": "masksae.train.config",
    "SweepConfig": "masksae.train.config",
    "EvaluateConfig": "masksae.evaluate.runner",
}

__all__ = ["__version__", "evaluate", "harvest", "train", *sorted(_EXPORTS)]


#: stage packages that are also the API functions (calling them runs masksae.api.<name>; see
#: masksae.callable_stage): importing a subpackage binds its name here anyway
_CALLABLE_STAGES = ("harvest", "train", "evaluate")


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_STAGES:
        return importlib.import_module(f"masksae.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'masksae' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_CALLABLE_STAGES})
