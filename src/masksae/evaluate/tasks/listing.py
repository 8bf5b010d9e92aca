"""``masksae tasks list``: the registry as a table, with what is available on this machine."""

from __future__ import annotations

from masksae.evaluate.tasks.registry import REGISTRY_LIST, TaskSpec, availability


def preset_uses() -> dict[str, list[str]]:
    """Task name -> ["<preset> <metric>", ...] for every preset that runs it."""
    from masksae.evaluate.probing.config import PRESETS

    uses: dict[str, list[str]] = {}
    for preset, factory in PRESETS.items():
        cfg = factory()
        for metric in ("sparse_probing", "scr", "tpp", "ood"):
            for name in getattr(cfg, metric).tasks:
                uses.setdefault(name, []).append(f"{preset}:{metric}")
    return uses


def task_table(kind: str | None = None, details: bool = False) -> str:
    """One line per registered task (name, kind, source, available, why, counts); with
    ``details`` the dataset, labels, split, licence, origin, notes and presets follow."""
    specs: list[TaskSpec] = [s for s in REGISTRY_LIST if kind is None or s.kind == kind]
    width = max(len(s.name) for s in specs) if specs else 4
    uses = preset_uses() if details else {}
    lines = [
        f"{'task':<{width}}  {'kind':<7}  {'source':<10}  {'here':<4}  why / counts",
        f"{'-' * width}  {'-' * 7}  {'-' * 10}  {'-' * 4}  {'-' * 12}",
    ]
    n_available = 0
    for spec in specs:
        ok, why = availability(spec)
        n_available += ok
        counts = spec.describe_counts()
        tail = why + (f"; {counts}" if counts else "")
        lines.append(
            f"{spec.name:<{width}}  {spec.kind:<7}  {spec.source:<10}  "
            f"{'yes' if ok else 'no':<4}  {tail}"
        )
        if details:
            for label, value in (
                ("what", spec.description),
                ("dataset", spec.dataset),
                ("labels", spec.labels),
                ("split", spec.split),
                ("licence", spec.licence),
                ("origin", spec.origin),
                ("notes", spec.notes),
                ("pooling", spec.pooling if spec.kind != "ood" else "last token"),
                ("presets", ", ".join(uses.get(spec.name, [])) or "none"),
            ):
                if value:
                    lines.append(f"{'':<{width}}    {label}: {value}")
    lines.append("")
    lines.append(
        f"{n_available} of {len(specs)} task(s) available here. Any binary or multi-class "
        "sae-probes file also works as a classes task: sae_probes:<file stem>."
    )
    return "\n".join(lines)


def task_records(kind: str | None = None) -> list[dict[str, object]]:
    """The registry as JSON-able records (``masksae tasks list --json``)."""
    uses = preset_uses()
    records: list[dict[str, object]] = []
    for spec in REGISTRY_LIST:
        if kind is not None and spec.kind != kind:
            continue
        ok, why = availability(spec)
        records.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "source": spec.source,
                "available": ok,
                "why": why,
                "dataset": spec.dataset,
                "description": spec.description,
                "labels": spec.labels,
                "split": spec.split,
                "licence": spec.licence,
                "class_counts": dict(spec.class_counts),
                "origin": spec.origin,
                "pooling": spec.pooling if spec.kind != "ood" else "last token",
                "presets": uses.get(spec.name, []),
            }
        )
    return records
