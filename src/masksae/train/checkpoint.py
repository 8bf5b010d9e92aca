"""Native checkpoints: ``sae.safetensors`` + ``config.json`` (+ ``train_state.pt`` to resume).

Layout of a training output directory::

    OUT/sweep.json                      the sweep (train config, runs, store) - refuses reuse
    OUT/<run>/sae.safetensors           final weights, float32, normalisation folded in
    OUT/<run>/config.json               meta (written last: its presence marks completion)
    OUT/<run>/train_state.pt            optimizer/scheduler/RNG/dead counters/stream position
    OUT/<run>/metrics.jsonl             one JSON record per logged step
    OUT/<run>/checkpoints/step-000001000/   periodic checkpoints, same three files

A checkpoint directory is written under a temporary name and renamed into place, so it is
either complete or absent. ``sae.safetensors`` always holds weights that act on raw store
activations; ``train_state.pt`` holds the (scaled) training-space weights needed for a
bit-exact resume.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from masksae import __version__
from masksae.atomic import atomic_write
from masksae.config import to_dict
from masksae.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


def sae_config_dict(sae: torch.nn.Module) -> dict[str, Any]:
    """JSON-able dict of an SAE's config dataclass."""
    return to_dict(sae.cfg)


def folded_copy(sae: torch.nn.Module, scale: float | None) -> torch.nn.Module:
    """A copy of ``sae`` acting on raw activations (``scale`` folded in); ``sae`` is untouched."""
    out = copy.deepcopy(sae)
    if scale is not None and scale != 1.0:
        out.fold_input_scale(float(scale))
    return out


def _weights_dict(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, value in sae.state_dict().items():
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        tensors[name] = value.contiguous().clone()
    return tensors


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_checkpoint(
    ckpt_dir: Path,
    sae: torch.nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None,
    scale: float | None,
) -> Path:
    """Write a complete checkpoint directory atomically (temp dir, fsync, rename)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        folded = folded_copy(sae, scale)
        save_file(_weights_dict(folded), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE):
            if (tmp / name).exists():
                _fsync_file(tmp / name)
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        os.replace(tmp, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


def publish(run_dir: Path, ckpt_dir: Path) -> None:
    """Copy a checkpoint's files to the run directory top level; config.json goes last."""
    for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE):
        src = ckpt_dir / name
        if src.exists():
            atomic_write(run_dir / name, lambda p, s=src: shutil.copyfile(s, p))


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete periodic checkpoints of a run, by step."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found: dict[int, Path] = {}
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_RE.match(child.name)
            if m and (child / CONFIG_FILE).exists():
                found[int(m.group(1))] = child
    return found


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temporary checkpoint directories left by a process killed while writing one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".") and ".tmp-" in child.name and child.is_dir():
                log.info("removing the partial checkpoint %s (the writer was killed)", child)
                shutil.rmtree(child, ignore_errors=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:09d}"


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest periodic checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    steps = sorted(list_checkpoints(run_dir))
    for step in steps[:-keep]:
        shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)


def build_meta(
    *,
    sae: torch.nn.Module,
    train: dict[str, Any],
    store: Any,
    step: int,
    tokens: int,
    scale: float | None,
    run_name: str,
    complete: bool,
) -> dict[str, Any]:
    """The config.json contents (the contract's ``meta``)."""
    return {
        "format_version": FORMAT_VERSION,
        "run_name": run_name,
        "sae": sae_config_dict(sae),
        "train": train,
        "store": dict(store.provenance),
        "store_fingerprint": store.fingerprint,
        "store_path": str(store.path),
        "step": int(step),
        "tokens": int(tokens),
        "masksae_version": __version__,
        "normalization_scale": None if scale is None else float(scale),
        "complete": bool(complete),
    }


def read_meta(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{cfg_path} is not valid JSON ({exc}): the checkpoint is damaged"
        ) from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}); re-export it with this masksae version"
        )
    return meta


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load a native run or checkpoint directory -> ``(sae, meta)``.

    ``sae`` acts on raw store activations (any training normalisation is folded in) and is
    in eval mode; ``meta`` is the checkpoint's config.json (keys ``sae``, ``train``,
    ``store`` (provenance), ``store_fingerprint``, ``step``, ``tokens``, ...).
    """
    from safetensors.torch import load_file

    from masksae.train.sae import build_sae, sae_config_from_dict

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a directory: pass a run folder written by "
            "`masksae train` (OUT/<run>)"
        )
    if not (path / CONFIG_FILE).exists():
        ckpts = list_checkpoints(path)
        hint = (
            f"; the latest periodic checkpoint is {ckpts[max(ckpts)]}, or finish the run with "
            "`masksae train ... --resume`"
            if ckpts
            else "; pass a run directory written by `masksae train` (OUT/<run name>)"
        )
        subs = sorted(p.name for p in path.iterdir() if (p / CONFIG_FILE).exists())
        if subs:
            hint = f"; it holds the runs {subs}: pass one of them"
        raise CheckpointError(f"{path} holds no finished SAE ({CONFIG_FILE} missing){hint}")
    meta = read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing: the checkpoint is incomplete")
    sae = build_sae(sae_config_from_dict(meta["sae"]))
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: a damaged file
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{weights} cannot be read ({type(exc).__name__}: {detail}): the weights file is "
            "truncated or damaged; restore it from a copy, or retrain the run"
        ) from exc
    try:
        sae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config.json: {exc}") from exc
    sae.to(device)
    sae.eval()
    return sae, meta
