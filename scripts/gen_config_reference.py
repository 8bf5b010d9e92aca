"""Write docs/config-reference.md from the typed config dataclasses.

The docstring line under each dataclass field is the documentation, so this page never
drifts from the code: rerun `make docs` after changing a config.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from masksae.config import field_docs  # noqa: E402 - after the source path is set

OUT = ROOT / "docs" / "config-reference.md"

SECTIONS: list[tuple[str, str, list[str]]] = [
    (
        "Harvest (`masksae harvest`)",
        "Keys of `masksae harvest --config FILE.toml` (top level); the flag of each is shown.",
        ["masksae.harvest.config:HarvestConfig"],
    ),
    (
        "Training loop (`[train]` table of a sweep TOML)",
        "`masksae train --config sweep.toml`; flags override the file.",
        ["masksae.train.config:TrainConfig"],
    ),
    (
        "SAE architectures (`[sae]` table and `[grid]` keys)",
        "Every architecture has the base fields; each adds its own.",
        [
            "masksae.train.sae_config:SAEConfig",
            "masksae.train.sae_config:TopKConfig",
            "masksae.train.sae_config:BatchTopKConfig",
            "masksae.train.sae_config:MatryoshkaBatchTopKConfig",
            "masksae.train.sae_config:ReLUConfig",
            "masksae.train.sae_config:JumpReLUConfig",
        ],
    ),
    (
        "Evaluation (`masksae evaluate`)",
        "`masksae evaluate --config FILE.toml`: EvaluateConfig's keys at the top level, the "
        "others in the table named by their flag prefix (`[data]`, `[absorption]`, ...).",
        [
            "masksae.evaluate.config:EvaluateConfig",
            "masksae.evaluate.config:EvalDataConfig",
            "masksae.evaluate.config:CoreConfig",
            "masksae.evaluate.config:DownstreamConfig",
            "masksae.evaluate.absorption.config:AbsorptionConfig",
            "masksae.evaluate.config:CooccurrenceConfig",
        ],
    ),
    (
        "Probing metrics (`masksae evaluate --metrics sparse_probing,scr,tpp,ood`)",
        "Defaults below are the references' protocol (the `paper` preset); "
        "`--probing-preset demo|offline|tiny` starts from smaller offline settings "
        "(`masksae.evaluate.probing.config.PRESETS`).",
        [
            "masksae.evaluate.probing.config:ProbingConfig",
            "masksae.evaluate.probing.config:SparseProbingConfig",
            "masksae.evaluate.probing.config:ScrConfig",
            "masksae.evaluate.probing.config:TppConfig",
            "masksae.evaluate.probing.config:OodConfig",
        ],
    ),
    (
        "Study (`masksae study`, `configs/study/*.toml`)",
        "Top-level keys, then the `[train]`, `[evaluate]`, `[report]` tables and each "
        "`[[store]]`; `[harvest]` takes HarvestConfig fields.",
        [
            "masksae.study.config:StudyConfig",
            "masksae.study.config:StudyTrain",
            "masksae.study.config:StudyEvaluate",
            "masksae.study.config:StudyReport",
            "masksae.study.config:StoreEntry",
        ],
    ),
]


#: class -> the flag prefix of its fields (its table in the config file)
FLAG_PREFIX = {
    "HarvestConfig": "",
    "TrainConfig": "train.",
    "SAEConfig": "sae.",
    "TopKConfig": "sae.",
    "BatchTopKConfig": "sae.",
    "MatryoshkaBatchTopKConfig": "sae.",
    "ReLUConfig": "sae.",
    "JumpReLUConfig": "sae.",
    "EvaluateConfig": "",
    "EvalDataConfig": "data.",
    "CoreConfig": "core.",
    "DownstreamConfig": "downstream.",
    "AbsorptionConfig": "absorption.",
    "CooccurrenceConfig": "cooccurrence.",
    "ProbingConfig": "probing.",
    "SparseProbingConfig": "probing.sparse_probing.",
    "ScrConfig": "probing.scr.",
    "TppConfig": "probing.tpp.",
    "OodConfig": "probing.ood.",
}
#: fields without a flag of their own (set by the command, or a nested table)
NO_FLAG = {
    "EvaluateConfig.progress",
    "EvaluateConfig.absorption",
    "EvaluateConfig.probing",
    "SAEConfig.d_in",
}


def aliases() -> dict[str, tuple[str, ...]]:
    """ "command:dotted key" -> the older flag names kept as aliases."""
    from masksae.evaluate.commands import ALIASES as EVALUATE
    from masksae.harvest.commands import ALIASES as HARVEST
    from masksae.train.commands import ALIASES as TRAIN

    out: dict[str, tuple[str, ...]] = {}
    for command, table in (("harvest", HARVEST), ("train", TRAIN), ("evaluate", EVALUATE)):
        out.update({f"{command}:{key}": names for key, names in table.items()})
    return out


def flag_cell(cls_name: str, field: dataclasses.Field) -> str:
    """The flag (and its aliases) of a field, or "" for a nested table / no flag."""
    if cls_name not in FLAG_PREFIX or f"{cls_name}.{field.name}" in NO_FLAG:
        return ""
    if field.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(  # type: ignore[misc]
        field.default_factory()  # type: ignore[misc]
    ):
        return ""
    key = FLAG_PREFIX[cls_name] + field.name
    if cls_name == "HarvestConfig":
        command = "harvest"
    elif key.startswith(("train.", "sae.")):
        command = "train"
    else:
        command = "evaluate"
    flag = "--" + key.replace("_", "-")
    return ", ".join(f"`{f}`" for f in (flag, *aliases().get(f"{command}:{key}", ())))


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated by `scripts/gen_config_reference.py` (`make docs`) from the config "
        "dataclasses; the field docstrings are the source of truth.",
        "",
    ]
    for title, intro, targets in SECTIONS:
        lines += [f"## {title}", ""]
        if intro:
            lines += [intro, ""]
        for target in targets:
            module_name, cls_name = target.split(":")
            cls = getattr(importlib.import_module(module_name), cls_name)
            docs = field_docs(cls)
            # fields declared in this class (field_docs also holds the bases' documentation)
            own = [
                f
                for f in dataclasses.fields(cls)
                if f.name in cls.__dict__.get("__annotations__", {})
            ]
            lines += [f"### `{cls_name}`", ""]
            summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
            if summary:
                lines += [summary, ""]
            with_flags = cls_name in FLAG_PREFIX
            if with_flags:
                lines += ["| field | flag | default | meaning |", "|---|---|---|---|"]
            else:
                lines += ["| field | default | meaning |", "|---|---|---|"]
            for f in own:
                doc = docs.get(f.name, "").replace("|", "\\|")
                if with_flags:
                    flag = flag_cell(cls_name, f).replace("|", "\\|")
                    lines.append(f"| `{f.name}` | {flag} | `{default_of(f)}` | {doc} |")
                else:
                    lines.append(f"| `{f.name}` | `{default_of(f)}` | {doc} |")
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
