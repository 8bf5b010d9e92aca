"""Architecture registry: name -> SAE class (its config class lives in the torch-free
``masksae.train.sae_config``, which this module's config lookups re-export)."""

from __future__ import annotations

from masksae.errors import ConfigError
from masksae.train.sae.base import SAEConfig, SparseAutoencoder
from masksae.train.sae_config import config_class, sae_config_from_dict

__all__ = ["build_sae", "config_class", "register", "sae_class", "sae_config_from_dict"]

_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(name: str):
    """Class decorator: make an SAE class buildable by ``name``."""

    def wrap(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        if cls.config_class is not config_class(name):
            raise ValueError(f"{cls.__name__}.config_class is not sae_config's {name!r} config")
        _REGISTRY[name] = cls
        return cls

    return wrap


def sae_class(name: str) -> type[SparseAutoencoder]:
    """The SAE class registered under ``name`` (ConfigError listing the valid names)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown SAE architecture {name!r}; valid: {sorted(_REGISTRY)}"
        ) from None


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE (fp32, CPU) for ``cfg``."""
    cls = sae_class(cfg.architecture)
    return cls(cfg)
