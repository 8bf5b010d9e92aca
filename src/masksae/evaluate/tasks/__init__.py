"""Probing tasks: the registry, the sae-probes and Hub loaders, seeded sampling.

>>> spec = get_spec("news_topic")
>>> data = load_classes("news_topic", n_train=100, n_test=50, seed=42)   # TaskData
"""

from masksae.evaluate.tasks.data import TEST, TRAIN, TaskData, TaskUnavailableError
from masksae.evaluate.tasks.registry import (
    GENERIC_PREFIX,
    KINDS,
    REGISTRY,
    REGISTRY_LIST,
    TaskSpec,
    availability,
    get_spec,
    load_classes,
    load_ood,
    load_scr,
    pool_counts,
)

__all__ = [
    "GENERIC_PREFIX",
    "KINDS",
    "REGISTRY",
    "REGISTRY_LIST",
    "TEST",
    "TRAIN",
    "TaskData",
    "TaskSpec",
    "TaskUnavailableError",
    "availability",
    "get_spec",
    "load_classes",
    "load_ood",
    "load_scr",
    "pool_counts",
]
