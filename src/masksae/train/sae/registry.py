"""Architecture registry: name -> (config class, SAE class)."""

from __future__ import annotations

from typing import Any

from masksae.config import from_dict
from masksae.errors import ConfigError
from masksae.train.sae.base import SAEConfig, SparseAutoencoder

_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(name: str):
    """Class decorator: make an SAE class buildable by ``name``."""

    def wrap(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
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


def config_class(name: str) -> type[SAEConfig]:
    """The config dataclass of architecture ``name``."""
    return sae_class(name).config_class


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE (fp32, CPU) for ``cfg``."""
    cls = sae_class(cfg.architecture)
    return cls(cfg)


def sae_config_from_dict(d: dict[str, Any]) -> SAEConfig:
    """Config from a dict (TOML table / config.json); ``d["architecture"]`` picks the class."""
    if "architecture" not in d:
        raise ConfigError(f"SAE config needs an 'architecture' key; valid: {sorted(_REGISTRY)}")
    cls = config_class(d["architecture"])
    return from_dict(cls, dict(d), where=f"sae[{d['architecture']}]")
