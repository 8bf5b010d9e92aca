"""Compression settings of the ``activations`` array, named by short strings.

``StoreSpec.compression`` takes one of these forms:

- ``"none"``: raw bytes (no compressor).
- ``"zstd:<level>"``: Zstandard at ``level`` (e.g. ``"zstd:1"``, ``"zstd:3"``).
- ``"blosc-<cname>[-<shuffle>][:<clevel>]"``: Blosc with compressor ``cname`` (``lz4``,
  ``lz4hc``, ``zstd``, ``zlib``, ``blosclz``) and shuffle ``noshuffle``, ``shuffle`` (byte
  shuffle) or ``bitshuffle``; default shuffle ``shuffle`` and clevel 5
  (e.g. ``"blosc-lz4-shuffle"``, ``"blosc-zstd-bitshuffle:3"``).

The default (:data:`DEFAULT_COMPRESSION`) was chosen by measurement; see
``docs/bench/store.md`` (bf16 activations compress little, so a fast codec wins).
The per-token arrays (ids, flags, indices) are small and always use zstd level 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from masksae.errors import ConfigError

DEFAULT_COMPRESSION = "none"
"""Measured default for activations: see docs/bench/store.md."""

METADATA_COMPRESSION = "zstd:3"
"""Compression of the small per-token arrays."""

_BLOSC_CNAMES = ("lz4", "lz4hc", "zstd", "zlib", "blosclz")
_BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed compression string."""

    kind: str
    """"none", "zstd" or "blosc"."""
    level: int = 0
    """Compression level (zstd level or blosc clevel)."""
    cname: str = ""
    """Blosc inner compressor name."""
    shuffle: str = ""
    """Blosc shuffle mode."""


def parse_compression(text: str) -> CompressionSpec:
    """Parse a compression string; ConfigError naming the accepted forms otherwise."""
    hint = (
        f"unknown compression {text!r}: expected 'none', 'zstd:<level>' or "
        f"'blosc-<{'|'.join(_BLOSC_CNAMES)}>[-<{'|'.join(_BLOSC_SHUFFLES)}>][:<clevel>]'"
    )
    name, _, level_text = text.strip().lower().partition(":")
    level: int | None = None
    if level_text:
        try:
            level = int(level_text)
        except ValueError:
            raise ConfigError(hint) from None
    if name == "none" and level is None:
        return CompressionSpec("none")
    if name == "zstd":
        level = 3 if level is None else level
        if not -7 <= level <= 22:
            raise ConfigError(f"{hint} (zstd level must be in [-7, 22])")
        return CompressionSpec("zstd", level=level)
    if name.startswith("blosc-"):
        parts = name.split("-")[1:]
        if len(parts) not in (1, 2) or parts[0] not in _BLOSC_CNAMES:
            raise ConfigError(hint)
        shuffle = parts[1] if len(parts) == 2 else "shuffle"
        if shuffle not in _BLOSC_SHUFFLES:
            raise ConfigError(hint)
        level = 5 if level is None else level
        if not 0 <= level <= 9:
            raise ConfigError(f"{hint} (blosc clevel must be in [0, 9])")
        return CompressionSpec("blosc", level=level, cname=parts[0], shuffle=shuffle)
    raise ConfigError(hint)


def zarr_compressors(text: str, itemsize: int) -> tuple:
    """The zarr v3 ``compressors`` tuple for a compression string and element size."""
    from zarr.codecs import BloscCodec, ZstdCodec

    spec = parse_compression(text)
    if spec.kind == "none":
        return ()
    if spec.kind == "zstd":
        return (ZstdCodec(level=spec.level),)
    return (
        BloscCodec(cname=spec.cname, clevel=spec.level, shuffle=spec.shuffle, typesize=itemsize),
    )
