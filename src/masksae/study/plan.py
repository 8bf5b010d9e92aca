"""Expand a StudyConfig into its stages: the exact ``masksae`` commands, in order.

Layout under the study's output folder OUT::

    OUT/stores/<store>/            one harvest per [[store]]
    OUT/configs/<store>-s<seed>.toml   the sweep file of one training pass
    OUT/sae/<store>/s<seed>/<run>/ SAEs of that pass (grid k of the store)
    OUT/eval/<store>/*.json        one result per checkpoint (all seeds of the store)
    OUT/eval-cache/                LLM activations shared by every evaluation
    OUT/report/                    main stores: the paper's table and the p ablation
    OUT/report-controls/           each control beside the clean baseline (index.md)
    OUT/study-state.json           finished stages, their signatures and wall times
    OUT/stages.md                  the same as a table

Training: one pass per (store, seed) - every k of the store steps on the same batches, as
``masksae train`` does with a grid - with the SAE init seed and the data-order seed both
set to the study seed (``[train] vary_data_order``). The harvest's mask draw is the same for
every seed: each p has one store (harvest seed ``[harvest] seed``).
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksae.config import load_toml
from masksae.errors import ConfigError
from masksae.study.config import StoreEntry, StudyConfig

STATE_FILE = "study-state.json"


@dataclass
class Stage:
    """One resumable step of the study."""

    key: str
    """Unique id, e.g. ``harvest/p0.3``, ``train/p0.3/s1``, ``evaluate/p0.3``."""
    kind: str
    """harvest | train | evaluate | report."""
    commands: list[list[str]]
    """``masksae`` argument lists run in order (without the program name)."""
    files: dict[str, str] = field(default_factory=dict)
    """Files (path -> text) written before the commands run (the per-seed sweep files)."""
    deps: list[str] = field(default_factory=list)
    """Stages whose output this one reads: it reruns when any of them reran."""
    resume_marker: str | None = None
    """Train: when this file exists the train command gets ``--resume``."""
    always: bool = False
    """Run even when recorded as done (reports: cheap, and their inputs may have grown)."""
    work: float = 1.0
    """Relative amount of work among stages of its kind, for the time projection: tokens
    (harvest), SAE-steps weighted by k (train), checkpoints (evaluate)."""

    def signature(self, dep_signatures: dict[str, str]) -> str:
        """Hash of the commands, the files and the dependencies' signatures."""
        payload = json.dumps(
            {
                "commands": self.commands,
                "files": self.files,
                "deps": [dep_signatures.get(d, "") for d in self.deps],
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def harvest_args(settings: dict[str, Any]) -> list[str]:
    """``masksae harvest`` flags of HarvestConfig field values (None values omitted)."""
    args: list[str] = []
    for name, value in settings.items():
        if value is None:
            continue
        if name == "devices":
            args += [_flag(name), ",".join(value) if isinstance(value, list) else str(value)]
        elif isinstance(value, bool):  # a --x/--no-x flag takes no value
            args.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif isinstance(value, dict):  # storage_options: --storage-option KEY=VALUE each
            for key, item in value.items():
                text = item if isinstance(item, str) else json.dumps(item)
                args += ["--storage-option", f"{key}={text}"]
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [_flag(name), str(item)]
        else:
            args += [_flag(name), _cli_value(value)]
    return args


def _cli_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def toml_dumps(data: dict[str, Any]) -> str:
    """TOML text of a dict of tables holding scalars and lists (what a sweep file needs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"cannot write the non-finite number {v!r} to a sweep file")
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to a sweep file")

    lines: list[str] = []
    for table, content in data.items():
        if not isinstance(content, dict):
            raise ConfigError(f"sweep file: [{table}] must be a table, not {content!r}")
        lines.append(f"[{table}]")
        lines += [f"{key} = {value(v)}" for key, v in content.items()]
        lines.append("")
    return "\n".join(lines)


def k_weight(k: int | None) -> float:
    """Relative step cost of a TopK-family SAE of sparsity ``k`` (k = 160 costs ~1.5x k = 20
    per step on CPU: docs/benchmarks.md)."""
    return 1.0 + max(0, (k or 20) - 20) / 300


def _train_work(text: str) -> float:
    sweep = tomllib.loads(text)
    train = sweep.get("train", {})
    batch = int(train.get("batch_size", 2048))
    steps = train.get("steps") or (train.get("tokens") or batch) // batch
    ks = sweep.get("grid", {}).get("k") or [sweep.get("sae", {}).get("k")]
    return float(steps) * batch * sum(k_weight(k) for k in ks)


def sweep_text(cfg: StudyConfig, store: StoreEntry, seed: int) -> str:
    """The sweep TOML of one training pass: the base sweep with the study's overrides, the
    seed (init and, with vary_data_order, data order) and the store's k list."""
    base = load_toml(cfg.train.sweep)
    unknown = sorted(set(base) - {"train", "sae", "grid"})
    if unknown:
        raise ConfigError(
            f"{cfg.train.sweep}: unknown table(s) {unknown}; a sweep file has [train], [sae], [grid]"
        )
    grid = dict(base.get("grid", {}))
    if "seed" in grid:
        raise ConfigError(
            f"{cfg.train.sweep}: grid.seed is set, but the study runs one pass per seed "
            f"([train] seeds = {cfg.train.seeds}): remove seed from the sweep's [grid]"
        )
    train = {**base.get("train", {}), **cfg.train.overrides, "seed": seed}
    if cfg.train.vary_data_order:
        train["data_seed"] = seed
    if store.k is not None:
        grid["k"] = list(store.k)
    sae = {**base.get("sae", {}), **cfg.train.sae_overrides}
    return toml_dumps({"train": train, "sae": sae, "grid": grid})


def _store_ks(cfg: StudyConfig, store: StoreEntry) -> list[int]:
    if store.k is not None:
        return list(store.k)
    return list(load_toml(cfg.train.sweep).get("grid", {}).get("k") or [None])


def plan_stages(cfg: StudyConfig, out: Path) -> list[Stage]:
    """Every stage of the study, in the order they run."""
    out = Path(out)
    progress = [] if cfg.progress else ["--no-progress"]
    stages: list[Stage] = []
    trained: dict[str, list[str]] = {}
    for store in cfg.stores:
        store_dir = out / "stores" / store.name
        settings = {**cfg.harvest.settings, **store.harvest, "mask_prob": store.mask_prob}
        if cfg.device != "auto" and "device" not in settings and "devices" not in settings:
            settings["device"] = cfg.device
        stages.append(
            Stage(
                key=f"harvest/{store.name}",
                kind="harvest",
                commands=[
                    ["harvest", *harvest_args(settings), "--out", str(store_dir), *progress],
                    ["store", "verify", str(store_dir), *progress],
                    ["store", "info", str(store_dir)],
                ],
                work=float(settings.get("tokens") or 1),
            )
        )
        if store.k == []:
            continue
        trained[store.name] = []
        for seed in cfg.train.seeds:
            sweep_path = out / "configs" / f"{store.name}-s{seed}.toml"
            run_dir = out / "sae" / store.name / f"s{seed}"
            device = [] if cfg.device == "auto" else ["--device", cfg.device]
            key = f"train/{store.name}/s{seed}"
            text = sweep_text(cfg, store, seed)
            stages.append(
                Stage(
                    key=key,
                    kind="train",
                    commands=[
                        [
                            "train",
                            "--store",
                            str(store_dir),
                            "--config",
                            str(sweep_path),
                            "--out",
                            str(run_dir),
                            *device,
                            *progress,
                        ]
                    ],
                    files={str(sweep_path): text},
                    deps=[f"harvest/{store.name}"],
                    resume_marker=str(run_dir / "sweep.json"),
                    work=_train_work(text),
                )
            )
            trained[store.name].append(key)
    ev = cfg.evaluate
    context = cfg.harvest.settings.get("context_length")
    for store in cfg.stores:
        if store.name not in trained:
            continue
        args = [
            "evaluate",
            "--checkpoints",
            *(str(out / "sae" / store.name / f"s{seed}") for seed in cfg.train.seeds),
            "--out",
            str(out / "eval" / store.name),
            "--cache",
            str(out / "eval-cache"),
            "--metrics",
            store.metrics or ev.metrics,
            "--probing-preset",
            ev.probing_preset,
            "--eval-tokens",
            str(ev.eval_tokens),
            "--ce-sequences",
            str(ev.ce_sequences),
            "--absorption-max-words",
            str(ev.absorption_max_words),
        ]
        if context is not None:
            args += ["--context-length", str(context)]
        if cfg.device != "auto":
            args += ["--device", cfg.device]
        if ev.eval_masked and store.role == "main" and store.mask_prob > 0:
            args.append("--eval-masked")
        args += list(ev.extra_args)
        stages.append(
            Stage(
                key=f"evaluate/{store.name}",
                kind="evaluate",
                commands=[args],
                deps=trained[store.name],
                work=float(len(cfg.train.seeds) * len(_store_ks(cfg, store))),
            )
        )
    stages += _report_stages(cfg, out, trained)
    return stages


def _report_stages(cfg: StudyConfig, out: Path, trained: dict[str, list[str]]) -> list[Stage]:
    main = [s.name for s in cfg.stores if s.role == "main" and s.name in trained]
    stages = []
    if main:
        stages.append(
            Stage(
                key="report/main",
                kind="report",
                commands=[
                    ["report", *(str(out / "eval" / n) for n in main), "--out", str(out / "report")]
                ],
                deps=[f"evaluate/{n}" for n in main],
                always=True,
            )
        )
    baseline = cfg.report.controls_baseline
    for store in cfg.stores:
        if store.role != "control" or store.name not in trained:
            continue
        # until the report keys cells by corruption, a control shares the cell (k, p) of
        # plain masking: each control gets its own report beside the clean baseline
        stages.append(
            Stage(
                key=f"report/controls/{store.name}",
                kind="report",
                commands=[
                    [
                        "report",
                        str(out / "eval" / baseline),
                        str(out / "eval" / store.name),
                        "--out",
                        str(out / "report-controls" / store.name),
                    ]
                ],
                deps=[f"evaluate/{baseline}", f"evaluate/{store.name}"],
                always=True,
            )
        )
    return stages
