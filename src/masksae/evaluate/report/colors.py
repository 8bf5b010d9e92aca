"""Fixed colours per method, the same in every report.

A method is (architecture, mask probability). Each architecture owns a sequential colour
map, and the mask probability picks the shade (darker = more masking); the unmasked
baseline is also drawn dashed. The colour depends on nothing else - not on which other
methods a report holds - so two reports can be read side by side.
"""

from __future__ import annotations

import zlib

ARCHITECTURE_COLORMAPS: dict[str, str] = {
    "matryoshka_batch_topk": "Blues",
    "batch_topk": "Greens",
    "topk": "Purples",
    "relu": "Oranges",
    "jumprelu": "Reds",
}
"""Colour map of each known architecture."""

OTHER_COLORMAPS: tuple[str, ...] = ("Greys", "YlOrBr", "PuRd", "BuGn")
"""Colour maps for other architectures, chosen by a stable hash of the name."""

SHADE_UNMASKED = 0.5
"""Shade (position in the colour map) of p = 0."""
SHADE_PER_P = 0.9
"""Shade added per unit of p: p = 0.2 -> 0.68, 0.3 -> 0.77, 0.5 -> 0.95."""
MAX_SHADE = 0.95


def colormap_name(architecture: str | None) -> str:
    """The colour map of ``architecture`` (a stable pick for unknown names)."""
    name = str(architecture)
    if name in ARCHITECTURE_COLORMAPS:
        return ARCHITECTURE_COLORMAPS[name]
    return OTHER_COLORMAPS[zlib.crc32(name.encode()) % len(OTHER_COLORMAPS)]


def shade(mask_prob: float) -> float:
    """Position in the colour map of a mask probability (monotone, capped)."""
    return min(MAX_SHADE, SHADE_UNMASKED + SHADE_PER_P * max(0.0, float(mask_prob)))


def method_color(architecture: str | None, mask_prob: float) -> str:
    """The colour of a method, as "#rrggbb"."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps[colormap_name(architecture)](shade(mask_prob)))


def method_linestyle(mask_prob: float) -> str:
    """Dashed for the unmasked baseline, solid for masked methods."""
    return "--" if mask_prob == 0 else "-"
