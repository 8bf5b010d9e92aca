"""masksae: masked-regularization sparse autoencoders, from LLM activations to reports."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("masksae")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
