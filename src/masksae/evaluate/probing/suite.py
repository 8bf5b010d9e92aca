"""What the four probing metrics share for one checkpoint: task texts, cached LLM activations,
cached SAE-independent probe results, the lazily loaded LLM and the phase timer.

Everything SAE-independent is keyed by (model spec, revision, layer, LLM dtype, the task's
sampled texts, capture settings) and cached, so the N-th checkpoint on the same model and
layer never loads the LLM and fits no LLM-activation probe: it encodes the cached activations
with its SAE and fits the SAE probes only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from masksae.errors import ConfigError
from masksae.evaluate.probing.activations import (
    CACHE_VERSION,
    ActivationCache,
    TokenActs,
    last_token_activations,
    token_activations,
)
from masksae.evaluate.probing.config import ProbingConfig
from masksae.evaluate.tasks import TaskData, get_spec, load_classes, load_ood, load_scr
from masksae.timing import PhaseTimer

log = logging.getLogger(__name__)


@dataclass
class ProbingContext:
    """One checkpoint's view of the probing machinery (see the module docstring)."""

    cfg: ProbingConfig
    cache: ActivationCache
    model: str
    """Model spec the activations come from (part of every cache key)."""
    revision: str | None
    layer: int
    llm_dtype: str
    get_lm: Callable[[], Any]
    """Loads (once) and returns the LLM; only called on a cache miss."""
    progress: bool = True
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    hits: dict[str, bool] = field(default_factory=dict)
    """Cache hit per task activation entry (recorded in the result)."""
    sae_memo: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    """The SAE's pooled latents per (task texts, pooling), shared by the metrics of one
    checkpoint (sparse probing and TPP read the same tasks)."""

    def sae_features(self, sae: Any, data: TaskData, acts: TokenActs, pooling: str) -> np.ndarray:
        """float32 [N_texts, F]: the SAE latents of ``data``'s texts, pooled (computed once
        per checkpoint)."""
        from masksae.evaluate.probing.pooling import sae_features

        key = (data.digest(), pooling)
        if key not in self.sae_memo:
            with self.timer.phase("sae_encode"):
                self.sae_memo[key] = sae_features(sae, acts, pooling, self.cfg.sae_batch_tokens)
        return self.sae_memo[key]

    def _key(self, what: str, data: TaskData, **extra: Any) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "what": what,
            "model": self.model,
            "revision": self.revision,
            "layer": int(self.layer),
            "llm_dtype": self.llm_dtype,
            "task": data.name,
            "texts": data.digest(),
            "prepend_bos": self.cfg.prepend_bos,
            **extra,
        }

    def pooling(self, name: str) -> str:
        """How task ``name``'s tokens are pooled ("mean" or "last", from the registry)."""
        return get_spec(name).pooling

    def _task(self, kind: str, name: str, load: Callable[[], TaskData]) -> TaskData:
        get_spec(name, kind)  # a clear error for a task of the wrong kind, before loading
        with self.timer.phase("task_data"):
            return load()

    def classes_task(
        self, name: str, n_train: int, n_test: int, seed: int, context_length: int
    ) -> tuple[TaskData, TokenActs]:
        """A classes task's texts and their per-token activations."""
        data = self._task("classes", name, lambda: load_classes(name, n_train, n_test, seed))
        return data, self._token_acts(data, context_length)

    def scr_task(
        self, name: str, q_train: int, q_test: int, seed: int, context_length: int
    ) -> tuple[TaskData, TokenActs]:
        """An SCR task's texts and their per-token activations."""
        data = self._task("scr", name, lambda: load_scr(name, q_train, q_test, seed))
        return data, self._token_acts(data, context_length)

    def ood_task(self, name: str) -> tuple[TaskData, np.ndarray]:
        """An OOD task's texts (train, then OOD test) and their last-token activations."""
        ood = self.cfg.ood
        data = self._task("ood", name, lambda: load_ood(name, ood.n_train, ood.pool, ood.seed))
        key = self._key("last-token", data, context_length=ood.context_length)
        entry = self.cache.get(key)
        self.hits[f"ood:{name}"] = entry is not None
        if entry is None:
            lm = self.get_lm()
            with self.timer.phase("llm_activations"):
                acts = last_token_activations(
                    lm,
                    self.layer,
                    data.texts,
                    context_length=ood.context_length,
                    prepend_bos=self.cfg.prepend_bos,
                    batch_size=self.cfg.llm_batch_size,
                    progress=self.progress,
                    desc=f"LLM {name}",
                )
            self.cache.put(key, {"acts": acts}, {"what": f"last-token activations of {name}"})
            return data, acts
        return data, entry[0]["acts"]

    def _token_acts(self, data: TaskData, context_length: int) -> TokenActs:
        key = self._key(
            "token-acts",
            data,
            context_length=context_length,
            dtype=self.cfg.cache_dtype,
            outlier_norm_factor=self.cfg.outlier_norm_factor,
        )
        entry = self.cache.get(key)
        self.hits[f"{data.kind}:{data.name}"] = entry is not None
        if entry is not None:
            return TokenActs(entry[0]["acts"], entry[0]["offsets"])
        lm = self.get_lm()
        with self.timer.phase("llm_activations"):
            acts = token_activations(
                lm,
                self.layer,
                data.texts,
                context_length=context_length,
                prepend_bos=self.cfg.prepend_bos,
                batch_size=self.cfg.llm_batch_size,
                dtype=self.cfg.cache_dtype,
                outlier_norm_factor=self.cfg.outlier_norm_factor,
                progress=self.progress,
                desc=f"LLM {data.name}",
            )
        self.cache.put(
            key,
            {"acts": acts.acts_ND, "offsets": acts.offsets},
            {"what": f"token activations of {data.name}", "n_tokens": int(acts.offsets[-1])},
        )
        return acts

    def memo(
        self,
        what: str,
        data: TaskData,
        settings: dict[str, Any],
        compute: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A cached SAE-independent result (LLM-activation probes) of ``data`` under
        ``settings``, computed by ``compute() -> (arrays, JSON-able meta)`` on a miss."""
        key = self._key(what, data, **settings)
        entry = self.cache.get(key)
        if entry is not None:
            return entry[0], {k: v for k, v in entry[1].items() if k != "what"}
        with self.timer.phase("llm_probes"):
            arrays, meta = compute()
        self.cache.put(key, arrays, {"what": f"{what} of {data.name}", **meta})
        return arrays, meta


def probing_sources(cfg: ProbingConfig, metrics: tuple[str, ...]) -> set[str]:
    """Hub dataset ids the configured probing tasks read."""
    names: list[str] = []
    for metric in metrics:
        section = getattr(cfg, metric, None)
        if section is not None:
            names += list(section.tasks)
    return {get_spec(n).dataset for n in names if get_spec(n).source == "hub"}


def check_disjoint(
    store_provenance: dict[str, Any], cfg: ProbingConfig, metrics: tuple[str, ...]
) -> None:
    """ConfigError when the checkpoint's SAE was trained on activations of a probing source
    (a Hub dataset a task reads, or the sae-probes data folder): probing texts must never be
    SAE training data."""
    from masksae.evaluate.tasks import sae_probes

    corpus = (store_provenance or {}).get("corpus") or {}
    source = str(corpus.get("source") or "")
    if not source:
        return
    hub_ids = probing_sources(cfg, metrics)
    data = sae_probes.data_dir()
    inside = False
    if data is not None and corpus.get("kind") == "local":
        try:
            Path(source).resolve().relative_to(data.resolve().parent)
            inside = True
        except (ValueError, OSError):
            inside = False
    if source in hub_ids or inside:
        raise ConfigError(
            f"the checkpoint's store was harvested from {source!r}, which the probing tasks "
            "read: probing texts would be SAE training data; harvest another corpus or choose "
            "other tasks (`masksae tasks list`)"
        )
