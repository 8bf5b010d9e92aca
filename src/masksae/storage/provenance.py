"""Reading a store's provenance: which corruption made it (for ``store info`` and reports).

The harvest records the plain masking of the paper in the top-level keys ``mask_prob``,
``mask_string`` and ``mask_token_id``; any other corruption (random-token replacement,
deletion, Gaussian noise, a special token as the mask) adds a ``corruption`` table whose
``kind`` names it. A store without that table was made by plain masking (every store of
masksae 0.1.0 included), so old stores keep their provenance and resume unchanged.
"""

from __future__ import annotations

from typing import Any

PLAIN_MASK = "mask"
"""The ``kind`` of the paper's corruption: replace the drawn tokens by the mask token."""


def corruption_kind(provenance: dict[str, Any]) -> str:
    """The corruption kind of a store: ``mask`` (also for stores without the table)."""
    table = provenance.get("corruption") or {}
    return str(table.get("kind", PLAIN_MASK))


def corruption_label(provenance: dict[str, Any]) -> str:
    """A short human label, e.g. ``mask '...' p=0.3`` or ``noise sigma=0.41 (matched to
    mask p=0.3)``; ``clean`` for p = 0 (nothing corrupted)."""
    p = float(provenance.get("mask_prob") or 0.0)
    table = provenance.get("corruption") or {}
    kind = corruption_kind(provenance)
    if kind == "noise":
        sigma = float(table.get("sigma", 0.0))
        source = table.get("sigma_source", "calibrated")
        if source == "given":
            return f"noise sigma={sigma:.4g}"
        return f"noise sigma={sigma:.4g} (matched to mask p={p:g})"
    if p == 0.0:
        return "clean"
    if kind == PLAIN_MASK:
        role = table.get("mask_token_role")
        token = repr(provenance.get("mask_string"))
        return f"mask {token}{f' ({role} token)' if role else ''} p={p:g}"
    if kind == "delete":
        return f"delete p={p:g}"
    return f"{kind.replace('_', ' ')} p={p:g}"
