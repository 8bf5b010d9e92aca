"""What a probing task hands to the metrics: labelled texts with a train/test split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from masksae.errors import MasksaeError

TRAIN, TEST = 0, 1
"""Values of :attr:`TaskData.split`. For OOD tasks TEST is the out-of-distribution set."""


class TaskUnavailableError(MasksaeError):
    """A probing task's data is not on this machine (package missing, Hub unreachable)."""


@dataclass
class TaskData:
    """The sampled texts of one task, ready for the LLM.

    ``labels`` mean, by task kind: ``classes`` - the class index into ``label_names``;
    ``scr`` - the quadrant ``2 * a + b`` where ``a`` is 1 for the first attribute's positive
    value and ``b`` for the second's (``label_names`` names the four quadrants); ``ood`` - 0/1
    by the reference's label encoding (sorted label strings, the later one is 1).
    """

    name: str
    """Registry name of the task."""
    kind: str
    """"classes", "scr" or "ood"."""
    texts: list[str]
    """Every text, train and test, in a fixed order."""
    labels: np.ndarray
    """int64 [N]: see the class docstring."""
    split: np.ndarray
    """int8 [N]: TRAIN (0) or TEST (1)."""
    label_names: list[str]
    """Name of each label value."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able description: source, sizes, counts (recorded in the result file)."""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.split = np.asarray(self.split, dtype=np.int8)
        if not (len(self.texts) == len(self.labels) == len(self.split)):
            raise ValueError(
                f"task {self.name}: {len(self.texts)} texts, {len(self.labels)} labels, "
                f"{len(self.split)} split flags"
            )

    def indices(self, split: int, label: int | None = None) -> np.ndarray:
        """Row indices of ``split`` (and ``label``), in order."""
        keep = self.split == split
        if label is not None:
            keep &= self.labels == label
        return np.flatnonzero(keep)

    def digest(self) -> str:
        """Hash of the texts, labels and split: part of every cache key built on this task."""
        h = hashlib.sha256()
        h.update(json.dumps(self.texts, ensure_ascii=False).encode())
        h.update(self.labels.tobytes())
        h.update(self.split.tobytes())
        return h.hexdigest()[:20]
