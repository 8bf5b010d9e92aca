"""Per-run metrics sinks: JSONL always, TensorBoard and W&B optionally (imported lazily)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from masksae.atomic import atomic_write_text
from masksae.errors import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLog:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` > ``step`` (used on resume: no duplicated steps)."""
        self._fh.close()
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a kill
                    continue
                if int(rec.get("step", 0)) <= step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class TensorBoardLog:
    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's module needs the tensorboard package
            raise ConfigError(
                "train.tensorboard = true but the tensorboard package is not installed: "
                "pip install tensorboard, or set tensorboard = false"
            ) from exc
        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._writer.close()


class WandbLog:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(
                "train.wandb = true but the wandb package is not installed: pip install wandb "
                "(and wandb login), or set wandb = false"
            ) from exc
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=project, name=name, config=config, dir=str(run_dir), reinit=True
        )

    def write(self, record: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()


def check_sinks_available(tensorboard: bool, wandb: bool) -> None:
    """Fail before training starts when an optional logger is requested but not installed."""
    import importlib.util

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "train.tensorboard = true but the tensorboard package is not installed: "
            "pip install tensorboard, or set tensorboard = false"
        )
    if wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.wandb = true but the wandb package is not installed: pip install wandb "
            "(and wandb login), or set wandb = false"
        )


class MetricsLog:
    """Fan-out to every configured sink of one run."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # closing a logger must never hide the real outcome
                log.warning("closing metrics sink %s failed", type(sink).__name__, exc_info=True)
