"""Run a study's stages in order, skipping the finished ones (rerun = continue).

Each stage runs its ``masksae`` commands in this process (the same code path and messages as
typing them; the equivalent shell lines are logged). A stage counts as done once all its
commands exited 0; it is then recorded in OUT/study-state.json with a signature of its
commands, files and upstream stages, and skipped by later runs while that signature holds.
An interrupted stage is simply rerun: harvest resumes from its last complete chunk, training
gets ``--resume`` (its sweep.json exists) and continues from its last checkpoint, evaluation
and reports recompute their (small) outputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masksae.atomic import atomic_write_json, atomic_write_text
from masksae.errors import MasksaeError
from masksae.study.config import StudyConfig
from masksae.study.plan import STATE_FILE, Stage, plan_stages

log = logging.getLogger(__name__)

_NOT_SIGNED = ("--no-progress",)
"""Flags left out of a stage's signature (they do not change its output)."""


class StageFailed(MasksaeError):
    """A stage command exited non-zero."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StageOutcome:
    """What happened to one stage in this run."""

    key: str
    status: str
    """ran | skipped | planned"""
    seconds: float
    """Wall time of this run's commands (0 when skipped; the recorded time is in the state)."""


def load_state(out: Path) -> dict[str, Any]:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is unreadable: every stage will be checked again", path)
        return {"stages": {}}


def shell_line(argv: list[str]) -> str:
    """The command as one would type it."""
    return "masksae " + " ".join(shlex.quote(a) for a in argv)


def invoke(argv: list[str], verbose: bool = False) -> int:
    """Run one ``masksae`` command in this process; its exit status."""
    from masksae.cli import app

    try:
        code = app(
            args=(["-v"] if verbose else []) + list(argv),
            prog_name="masksae",
            standalone_mode=False,
        )
    except SystemExit as exc:  # sys.exit inside a command (e.g. Ctrl-C: 130)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return int(code or 0)


def _signature_stage(stage: Stage) -> Stage:
    commands = [[a for a in argv if a not in _NOT_SIGNED] for argv in stage.commands]
    return Stage(stage.key, stage.kind, commands, stage.files, stage.deps)


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    *,
    dry_run: bool = False,
    verbose: bool = False,
    echo: Any = print,
) -> list[StageOutcome]:
    """Run (or with ``dry_run`` list) every stage not yet done; return what happened."""
    out = Path(out)
    stages = plan_stages(cfg, out)
    state = load_state(out)
    done = state.setdefault("stages", {})
    signatures: dict[str, str] = {}
    outcomes: list[StageOutcome] = []
    if cfg.banner:
        echo(_banner(cfg.banner))
    start = time.perf_counter()
    for i, stage in enumerate(stages):
        signature = _signature_stage(stage).signature(signatures)
        signatures[stage.key] = signature
        recorded = done.get(stage.key, {})
        upstream_ran = any(o.key in stage.deps and o.status != "skipped" for o in outcomes)
        finished = recorded.get("signature") == signature and not upstream_ran
        label = f"[{i + 1}/{len(stages)}] {stage.key}"
        if finished and not stage.always:
            echo(f"{label}: done ({recorded.get('seconds', 0):.0f} s recorded), skipped")
            outcomes.append(StageOutcome(stage.key, "skipped", 0.0))
            continue
        commands = [list(argv) for argv in stage.commands]
        if stage.resume_marker and Path(stage.resume_marker).exists():
            commands[0].append("--resume")
        if dry_run:
            echo(f"{label}: to run")
            for argv in commands:
                echo(f"    {shell_line(argv)}")
            outcomes.append(StageOutcome(stage.key, "planned", 0.0))
            continue
        echo(f"{label}: running")
        for path, text in stage.files.items():
            atomic_write_text(Path(path), text)
        t0 = time.perf_counter()
        for argv in commands:
            log.info("study %s: %s", stage.key, shell_line(argv))
            code = invoke(argv, verbose=verbose)
            if code != 0:
                raise StageFailed(
                    f"stage {stage.key} failed: `{shell_line(argv)}` exited with status {code}; "
                    f"finished stages are kept in {out / STATE_FILE}: fix the cause and rerun "
                    "the same study command to continue",
                    exit_code=code,
                )
        seconds = time.perf_counter() - t0
        done[stage.key] = {
            "signature": signature,
            "seconds": round(seconds, 1),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "commands": [shell_line(argv) for argv in commands],
        }
        state["name"] = cfg.name
        atomic_write_json(out / STATE_FILE, state)
        echo(f"{label}: finished in {seconds:.0f} s")
        outcomes.append(StageOutcome(stage.key, "ran", seconds))
        projection = project_remaining(stages[i + 1 :], stages, done)
        if projection:
            echo(f"    elapsed {(time.perf_counter() - start) / 60:.1f} min; {projection}")
    if not dry_run:
        atomic_write_text(out / "stages.md", stages_table(cfg, stages, state))
        _write_controls_index(cfg, out)
        echo(
            f"study {cfg.name!r}: {sum(o.status == 'ran' for o in outcomes)} stage(s) run in "
            f"{time.perf_counter() - start:.0f} s, "
            f"{sum(o.status == 'skipped' for o in outcomes)} already done; "
            f"stage times in {out / 'stages.md'}"
        )
    if cfg.banner:
        echo(_banner(cfg.banner))
    return outcomes


def project_remaining(remaining: list[Stage], stages: list[Stage], done: dict[str, Any]) -> str:
    """'projected remaining ~N min (harvest a, train b, ...)' from the recorded seconds per
    unit of work of each stage kind; kinds not yet timed are named instead."""
    rate: dict[str, float] = {}
    for kind in {s.kind for s in stages}:
        timed = [s for s in stages if s.kind == kind and s.key in done and s.work > 0]
        work = sum(s.work for s in timed)
        if work > 0:
            rate[kind] = sum(float(done[s.key]["seconds"]) for s in timed) / work
    todo = [s for s in remaining if not (s.key in done and not s.always)]
    if not todo:
        return ""
    by_kind: dict[str, float] = {}
    unknown: list[str] = []
    for s in todo:
        if s.kind in rate:
            by_kind[s.kind] = by_kind.get(s.kind, 0.0) + rate[s.kind] * s.work
        elif s.kind not in unknown:
            unknown.append(s.kind)
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in by_kind.items())
    untimed = f"{', '.join(unknown)} not timed yet"
    if not by_kind:
        return f"projected remaining: {untimed}"
    text = f"projected remaining ~{sum(by_kind.values()) / 60:.0f} min ({parts})"
    return f"{text} + {untimed}" if unknown else text


def _banner(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines()]
    width = max(len(line) for line in lines) + 4
    rule = "#" * width
    return "\n".join([rule, *(f"# {line.ljust(width - 4)} #" for line in lines), rule])


def stages_table(cfg: StudyConfig, stages: list[Stage], state: dict[str, Any]) -> str:
    """Markdown table of every stage's recorded wall time and commands, with totals per kind."""
    done = state.get("stages", {})
    rows = []
    totals: dict[str, float] = {}
    for stage in stages:
        rec = done.get(stage.key)
        seconds = float(rec["seconds"]) if rec else 0.0
        totals[stage.kind] = totals.get(stage.kind, 0.0) + seconds
        commands = "<br>".join(f"`{c}`" for c in rec["commands"]) if rec else "not run"
        rows.append(f"| {stage.key} | {seconds:.0f} | {commands} |")
    total = sum(totals.values())
    kinds = ", ".join(f"{k} {v / 60:.1f} min" for k, v in totals.items())
    return (
        f"# Study {cfg.name!r}: stages\n\n"
        f"Recorded wall time: {total / 60:.1f} min in all ({kinds}). Each stage's time is "
        "that of the run that finished it (a resumed stage counts only its last run).\n\n"
        "| stage | seconds | commands |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _write_controls_index(cfg: StudyConfig, out: Path) -> None:
    controls = [s for s in cfg.stores if s.role == "control" and s.k != []]
    if not controls:
        return
    from masksae.storage import ActivationStore
    from masksae.storage.provenance import corruption_label

    def label(name: str) -> str:
        try:
            return corruption_label(ActivationStore.open(out / "stores" / name).provenance)
        except MasksaeError:
            return "(store not readable)"

    base, ref = cfg.report.controls_baseline, cfg.report.controls_reference
    lines = [
        "# Controls: alternative corruptions at the masking's rate",
        "",
        f"Each control's SAEs are reported beside the clean baseline `{base}` "
        f"({label(base)}) in its own folder; plain masking at the same rate is `{ref}` "
        f"({label(ref)}), in [../report/report.md](../report/report.md). In each control's "
        "report the column of p > 0 is the control, not plain masking.",
        "",
        "| store | corruption | report |",
        "|---|---|---|",
    ]
    lines += [
        f"| {s.name} | {label(s.name)} | [{s.name}/report.md]({s.name}/report.md) |"
        for s in controls
    ]
    atomic_write_text(out / "report-controls" / "index.md", "\n".join(lines) + "\n")
