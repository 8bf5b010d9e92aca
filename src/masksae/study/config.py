"""StudyConfig: one study (demo, CPU study or the paper's protocol) as a TOML file.

```toml
name = "study"
banner = "..."                      # printed at the start and the end

[harvest]                           # HarvestConfig fields shared by every store
model = "bundled:smollm2-135m"
layer = 15
tokens = 786_432

[train]
sweep = "configs/study-sweep.toml"  # base sweep: [train] and [sae]; its grid is set per store
seeds = [0, 1, 2]

[evaluate]
metrics = "core,absorption"

[[store]]                           # one harvest each, in this order
name = "p0.3"
mask_prob = 0.3
k = [20, 40, 80, 160]               # sparsities trained on it (one pass per seed)

[[store]]
name = "random-unigram"
role = "control"
mask_prob = 0.3
k = [20]
harvest = { corruption = "random_unigram" }
```

Paths in the file are relative to the working directory (the repository root for ``make``).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksae.config import from_dict, load_toml
from masksae.errors import ConfigError

ROLES = ("main", "control")


@dataclass
class StoreEntry:
    """One store of the study: a harvest, and the SAEs trained on it."""

    name: str
    """Folder name under OUT/stores (and OUT/sae, OUT/eval), e.g. ``p0.3``."""
    mask_prob: float
    """Corruption rate p of this store (0 = clean)."""
    k: list[int] | None = None
    """Sparsities (grid k) trained on this store, one pass per seed; None = the base sweep's
    grid k; [] = harvest only."""
    role: str = "main"
    """``main``: in the paper's table and the p ablation (OUT/report); ``control``: an
    alternative corruption, reported beside ``report.controls_baseline`` (OUT/report-controls)."""
    harvest: dict[str, Any] = field(default_factory=dict)
    """HarvestConfig fields overriding [harvest] for this store (corruption, mask_string,
    mask_token_role, noise_sigma, ...)."""
    metrics: str | None = None
    """--metrics of this store's evaluation; None = [evaluate] metrics (a study can keep the
    costlier probing suite to the stores of the paper's table)."""


@dataclass
class StudyHarvest:
    """[harvest]: HarvestConfig fields shared by every store (``out`` and ``mask_prob`` are
    set per store)."""

    settings: dict[str, Any] = field(default_factory=dict)
    """The table as written; validated against HarvestConfig's fields."""


@dataclass
class StudyTrain:
    """[train]: how the SAEs of every store are trained."""

    sweep: str = "configs/study-sweep.toml"
    """Base sweep TOML ([train], [sae]; a [grid] other than k is kept and crossed in)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One training pass per seed: SAE init seed = data-order seed = this value (see
    ``vary_data_order``); the harvest's mask draw does not vary (one store per p)."""
    vary_data_order: bool = True
    """Set the sweep's data_seed to the seed too, so seeds differ in data order and not only
    in initialisation; False keeps the base sweep's data_seed for every seed."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields overriding the base sweep's [train] table (steps, batch_size, ...)."""
    sae_overrides: dict[str, Any] = field(default_factory=dict)
    """SAE config fields overriding the base sweep's [sae] table (d_sae, ...)."""


@dataclass
class StudyEvaluate:
    """[evaluate]: ``masksae evaluate`` settings, one call per store."""

    metrics: str = "core,absorption,cooccurrence"
    """--metrics: a comma list of what ``masksae evaluate --help`` accepts."""
    eval_tokens: int = 16384
    """--eval-tokens: held-out activations scored."""
    ce_sequences: int = 32
    """--ce-sequences: sequences for CE loss recovered / KL."""
    absorption_max_words: int | str = "demo"
    """--absorption-max-words: words per letter, a preset of the absorption config's
    VOCAB_PRESETS (demo, study, all) or 0 for every word (SAEBench)."""
    probing_preset: str = "demo"
    """--probing-preset when the metrics include the probing suite (demo, offline, paper,
    tiny; see the probing config's PRESETS)."""
    eval_masked: bool = False
    """Add --eval-masked for main stores with p > 0 (metrics on masked text too)."""
    extra_args: list[str] = field(default_factory=list)
    """More ``masksae evaluate`` flags, appended as given (e.g. ["--eval-corpus", "x"])."""


@dataclass
class StudyReport:
    """[report]: which evaluation results go into which report."""

    controls_baseline: str = "p0.0"
    """Store whose results every control is reported beside (the clean SAEs)."""
    controls_reference: str = "p0.3"
    """Plain-masking store at the controls' rate, listed first in OUT/report-controls."""


@dataclass
class StudyConfig:
    """A whole study: stores, training, evaluation, reports."""

    name: str = "study"
    """Name shown in logs and the stage summary."""
    banner: str = ""
    """Printed at the start and the end (the demo says it is a smoke run)."""
    device: str = "auto"
    """--device for harvest, train and evaluate."""
    progress: bool = True
    """Progress bars of the stage commands (stderr)."""
    harvest: StudyHarvest = field(default_factory=StudyHarvest)
    """[harvest] table."""
    train: StudyTrain = field(default_factory=StudyTrain)
    """[train] table."""
    evaluate: StudyEvaluate = field(default_factory=StudyEvaluate)
    """[evaluate] table."""
    report: StudyReport = field(default_factory=StudyReport)
    """[report] table."""
    stores: list[StoreEntry] = field(default_factory=list)
    """[[store]] tables, harvested in order."""

    def store(self, name: str) -> StoreEntry:
        for entry in self.stores:
            if entry.name == name:
                return entry
        raise ConfigError(
            f"study store {name!r} is not defined: the [[store]] names are "
            f"{[s.name for s in self.stores]}"
        )


def _harvest_fields() -> set[str]:
    from masksae.harvest.config import HarvestConfig

    return {f.name for f in dataclasses.fields(HarvestConfig)}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to the raw TOML dict (value parsed as a TOML value,
    else taken as a string); ``store.NAME.key=value`` reaches into a [[store]] entry. Returns
    a changed copy."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value: e.g. --set harvest.tokens=20000")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        key = key.strip()
        target: dict[str, Any] = data
        if key.startswith("store."):
            # store names may hold dots (p0.3): match the longest name followed by a dot
            rest = key[len("store.") :]
            names = sorted(
                (s.get("name", "") for s in data.get("store", [])), key=len, reverse=True
            )
            name = next((n for n in names if n and rest.startswith(n + ".")), None)
            if name is None:
                raise ConfigError(
                    f"--set {item!r}: no [[store]] name matches; the names are {names}"
                )
            target = next(s for s in data["store"] if s.get("name") == name)
            parts = rest[len(name) + 1 :].split(".")
        else:
            parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a table")
        target[parts[-1]] = value
    return data


def study_from_dict(data: dict[str, Any], where: str = "study") -> StudyConfig:
    """Validate a raw study dict into a StudyConfig."""
    data = dict(data)
    known = {
        "name",
        "banner",
        "device",
        "progress",
        "harvest",
        "train",
        "evaluate",
        "report",
        "store",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    harvest = dict(data.pop("harvest", {}))
    bad = sorted(set(harvest) - _harvest_fields())
    if bad:
        raise ConfigError(
            f"{where} [harvest]: unknown HarvestConfig field(s) {bad}; see "
            "docs/config-reference.md (masksae.harvest.HarvestConfig)"
        )
    for reserved in ("out", "mask_prob"):
        if reserved in harvest:
            raise ConfigError(
                f"{where} [harvest]: {reserved} is set per store by the study: remove it"
            )
    stores = [
        from_dict(StoreEntry, s, where=f"{where} [[store]] #{i + 1}")
        for i, s in enumerate(data.pop("store", []))
    ]
    cfg = StudyConfig(
        name=str(data.get("name", "study")),
        banner=str(data.get("banner", "")),
        device=str(data.get("device", "auto")),
        progress=bool(data.get("progress", True)),
        harvest=StudyHarvest(settings=harvest),
        train=from_dict(StudyTrain, data.get("train", {}), where=f"{where} [train]"),
        evaluate=from_dict(StudyEvaluate, data.get("evaluate", {}), where=f"{where} [evaluate]"),
        report=from_dict(StudyReport, data.get("report", {}), where=f"{where} [report]"),
        stores=stores,
    )
    _validate(cfg, where)
    return cfg


def _validate(cfg: StudyConfig, where: str) -> None:
    if not cfg.stores:
        raise ConfigError(f"{where}: no [[store]] table: a study harvests at least one store")
    names = [s.name for s in cfg.stores]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: [[store]] names {dupes} repeat: give each store its own name")
    fields = _harvest_fields()
    for s in cfg.stores:
        if not s.name or "/" in s.name or s.name.startswith("."):
            raise ConfigError(f"{where}: store name {s.name!r} must be a plain folder name")
        if s.role not in ROLES:
            raise ConfigError(
                f"{where}: store {s.name!r} has role {s.role!r}: expected one of {ROLES}"
            )
        bad = sorted(set(s.harvest) - fields)
        if bad:
            raise ConfigError(
                f"{where}: store {s.name!r} harvest overrides {bad} are not HarvestConfig fields"
            )
        if {"out", "mask_prob"} & set(s.harvest):
            raise ConfigError(
                f"{where}: store {s.name!r}: set mask_prob on the store itself, not in harvest"
            )
        if s.k is not None and any(
            isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in s.k
        ):
            raise ConfigError(f"{where}: store {s.name!r} k = {s.k!r}: expected positive integers")
    if not cfg.train.seeds or len(set(cfg.train.seeds)) != len(cfg.train.seeds):
        raise ConfigError(
            f"{where} [train] seeds = {cfg.train.seeds!r}: expected a non-empty list of "
            "distinct integers, e.g. [0, 1, 2]"
        )
    controls = [s for s in cfg.stores if s.role == "control"]
    if controls:
        for ref in (cfg.report.controls_baseline, cfg.report.controls_reference):
            if ref not in names:
                raise ConfigError(
                    f"{where} [report]: store {ref!r} (controls baseline/reference) is not "
                    f"a [[store]]: the names are {names}"
                )


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:  # type: ignore[assignment]
    """Read a study TOML file, apply ``--set`` overrides, validate."""
    data = apply_overrides(load_toml(path), list(overrides))
    return study_from_dict(data, where=str(path))
