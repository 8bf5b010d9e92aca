"""masksae: masked-regularization sparse autoencoders, from LLM activations to reports.

The notebook API (see README "Python API"), imported on first use so that ``import masksae``
stays light (no torch)::

    masksae.harvest(...), masksae.train(...), masksae.evaluate(...)
    masksae.open_store(path), masksae.load_sae(path), masksae.ActivationStore(path)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from masksae.lazy_exports import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=_CALLABLE_STAGES)
