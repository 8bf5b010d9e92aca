"""Group result documents into settings and cells; name methods.

A *setting* is (model, layer, architecture, d_sae); inside it a *cell* is (k, mask_prob) and
holds one result per seed. When several checkpoints of one run (same setting, cell and seed)
are given, only the latest step counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

Setting = tuple[Any, Any, Any, Any]
"""(model, layer, architecture, d_sae)."""
Cell = tuple[Any, float]
"""(k, mask_prob)."""
Cells = dict[Cell, list[dict[str, Any]]]
"""The cells of one setting: (k, p) -> one result per seed, sorted by seed."""


def provenance(doc: dict[str, Any], key: str) -> Any:
    """``doc["provenance"][key]`` (None when absent)."""
    return doc["provenance"].get(key)


def seed_of(doc: dict[str, Any]) -> Any:
    """The training seed: what pairs a masked run with its unmasked twin."""
    return provenance(doc, "seed")


def setting_of(doc: dict[str, Any]) -> Setting:
    return (
        provenance(doc, "model"),
        provenance(doc, "layer"),
        provenance(doc, "architecture"),
        provenance(doc, "d_sae"),
    )


def cell_of(doc: dict[str, Any]) -> Cell:
    return (provenance(doc, "k"), float(provenance(doc, "mask_prob") or 0.0))


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers first in numeric order, then anything else (None, strings) as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def group_results(docs: Sequence[dict[str, Any]]) -> dict[Setting, Cells]:
    """setting -> (k, p) -> one result per seed (the latest step when a seed repeats).

    Settings, cells and seeds come out in a stable order (numbers numerically)."""
    latest: dict[tuple[Setting, Cell, Any], dict[str, Any]] = {}
    for doc in docs:
        ident = (setting_of(doc), cell_of(doc), seed_of(doc))
        old = latest.get(ident)
        if old is None or (provenance(doc, "step") or 0) >= (provenance(old, "step") or 0):
            latest[ident] = doc
    grouped: dict[Setting, Cells] = defaultdict(lambda: defaultdict(list))

    def order(item: tuple[tuple[Setting, Cell, Any], dict[str, Any]]) -> tuple:
        (setting, (k, p), seed), _ = item
        return (tuple(sort_key(v) for v in setting), sort_key(k), p, sort_key(seed))

    for (setting, cell, _seed), doc in sorted(latest.items(), key=order):
        grouped[setting][cell].append(doc)
    return {s: dict(c) for s, c in grouped.items()}


def ks_of(cells: Cells) -> list[Any]:
    """The k values of a setting, ascending."""
    return sorted({k for k, _ in cells}, key=sort_key)


def ps_of(cells: Cells, k: Any = ...) -> list[float]:
    """The mask probabilities of a setting (at one k when given), ascending."""
    return sorted({p for kk, p in cells if k is ... or kk == k})


def method_label(p: float) -> str:
    """The paper's method names: "w/o masking" (p = 0), "w/ masking (p=0.3)"."""
    return "w/o masking" if p == 0 else f"w/ masking (p={p:g})"


def short_method(p: float) -> str:
    """ "w/o" or "w/ p=0.3" for compact column headers."""
    return "w/o" if p == 0 else f"w/ p={p:g}"


def k_label(k: Any) -> str:
    return f"k={k}" if k is not None else "k=?"


def setting_title(setting: Setting) -> str:
    model, layer, arch, d_sae = setting
    return f"{model} layer {layer} · {arch} · d_sae={d_sae}"


def slug(*parts: Any) -> str:
    """A file-name-safe join of ``parts``."""
    text = "-".join(str(p) for p in parts if p is not None)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def setting_slug(setting: Setting) -> str:
    model, layer, arch, d_sae = setting
    return slug(model, f"L{layer}", arch, d_sae)


def by_model_layer(grouped: dict[Setting, Cells]) -> dict[tuple[Any, Any], dict[Setting, Cells]]:
    """(model, layer) -> its settings: the frontier figure puts every architecture on one plot."""
    out: dict[tuple[Any, Any], dict[Setting, Cells]] = {}
    for setting, cells in grouped.items():
        out.setdefault((setting[0], setting[1]), {})[setting] = cells
    return out


def seeds_label(docs: Iterable[dict[str, Any]]) -> str:
    """ "2 (seeds 0, 1)": how many runs back a cell, and which seeds ("n/a" when none)."""
    seeds = sorted((seed_of(d) for d in docs), key=sort_key)
    if not seeds:
        return "n/a"
    word = "seed" if len(seeds) == 1 else "seeds"
    return f"{len(seeds)} ({word} {', '.join(str(s) for s in seeds)})"
