"""Evaluate checkpoints: load each SAE, get (cached) held-out activations, run the metrics,
write one result JSON per checkpoint.

The LLM is loaded once per (model, device) and kept for the whole run; the evaluation
activations, the zero-ablation baseline and the absorption LLM stage are cached on disk
(``cache_dir``), so every checkpoint after the first on the same model and layer skips the
LLM capture passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from masksae.atomic import atomic_write_json
from masksae.config import to_dict
from masksae.errors import CheckpointError, ConfigError

# the settings live in the torch-free masksae.evaluate.config (X as X: still importable here)
from masksae.evaluate.config import ALL as ALL
from masksae.evaluate.config import METRICS as METRICS
from masksae.evaluate.config import PROBING_METRICS, EvaluateConfig
from masksae.evaluate.config import CooccurrenceConfig as CooccurrenceConfig
from masksae.evaluate.config import CoreConfig as CoreConfig
from masksae.evaluate.config import DownstreamConfig as DownstreamConfig
from masksae.evaluate.config import EvalDataConfig as EvalDataConfig
from masksae.evaluate.core import iter_batches, reconstruction_metrics
from masksae.evaluate.data import (
    EvalData,
    build_eval_data,
    has_entry,
    key_fields,
    load_or_build,
    store_activations,
)
from masksae.evaluate.downstream import downstream_metrics
from masksae.evaluate.schema import make_result, provenance_from_meta
from masksae.timing import PhaseTimer

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates checkpoints one after another, keeping the LLM loaded between them."""

    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg
        self._lms: dict[str, Any] = {}
        self._baselines: dict[str, dict[str, float]] = {}
        self._clean_caches: dict[str, Any] = {}
        self._probing_cache: Any = None
        self._revision: str | None = None  # Hub commit of the checkpoint being evaluated
        if not cfg.progress:  # --no-progress also silences transformers' weight-loading bar
            import transformers

            transformers.utils.logging.disable_progress_bar()

    def _lm(self, spec: str, timer: PhaseTimer) -> Any:
        # a Hub model loads at the commit its store was harvested from
        key = f"{spec}@{self._revision}" if self._revision else spec
        if key not in self._lms:
            from masksae.models import load_model

            with timer.phase("load_llm"):
                self._lms[key] = load_model(
                    spec,
                    dtype=self.cfg.llm_dtype,
                    device=self.cfg.device,
                    revision=self._revision,
                )
        return self._lms[key]

    def evaluate(self, checkpoint: str | Path) -> dict[str, Any]:
        """Score one checkpoint (run or checkpoint directory); return the result document."""
        from masksae.progress import show_progress

        with show_progress(self.cfg.progress):
            doc = self._evaluate(checkpoint)
        doc["settings"] = evaluation_settings(self.cfg, checkpoint)
        return doc

    def _evaluate(self, checkpoint: str | Path) -> dict[str, Any]:
        import torch

        from masksae.devices import resolve_device
        from masksae.train.checkpoint import load_sae

        cfg = self.cfg
        timer = PhaseTimer()
        t_start = time.perf_counter()
        device = resolve_device(cfg.device)
        with timer.phase("load_sae"):
            sae, meta = load_sae(checkpoint, device=device)
        sae.eval()
        threshold = getattr(sae, "threshold", None)
        if threshold is not None and threshold.numel() == 1 and float(threshold) < 0:
            log.warning(
                "%s: the inference threshold was never learned (the run stopped before "
                "threshold_start_step); encode falls back to batch top-k, so its metrics depend "
                "on the evaluation batch and `masksae export` will refuse it",
                checkpoint,
            )
        prov = provenance_from_meta(meta)
        model_spec = cfg.model_override or prov["model"]
        self._revision = _hub_commit(model_spec, prov["revision"])
        layer = prov["layer"]
        if model_spec is None or layer is None:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} names no model/layer in its "
                "store provenance: cannot make evaluation activations"
            )
        d_sae = int(prov["d_sae"] or sae.cfg.d_sae)
        metrics: dict[str, Any] = {}
        eval_info: dict[str, Any] = {"config": to_dict(cfg.data)}
        data_memo: dict[bool, EvalData] = {}  # several metrics read the same activations

        def get_data(masked: bool) -> EvalData:
            if masked in data_memo:
                return data_memo[masked]
            dcfg = replace(cfg.data, masked=masked)
            if masked:
                p = prov["mask_prob"] or 0.0
                store = meta.get("store") or {}
                dcfg = replace(
                    dcfg,
                    mask_prob=p if p > 0 else cfg.data.mask_prob,
                    mask_token_id=store.get("mask_token_id"),
                    mask_string=store.get("mask_string") or cfg.data.mask_string,
                )
            fields = key_fields(model_spec, prov["revision"], layer, dcfg)
            if not has_entry(cfg.cache_dir, fields):
                self._lm(model_spec, timer)  # timed as load_llm, not eval_data
            with timer.phase("eval_data"):
                data, hit = load_or_build(
                    cfg.cache_dir,
                    fields,
                    lambda: build_eval_data(self._lm(model_spec, timer), layer, None, dcfg),
                )
            eval_info["masked" if masked else "clean"] = {**data.meta, "cache_hit": hit}
            data_memo[masked] = data
            return data

        def core_on(acts) -> dict[str, Any]:
            from masksae.progress import progress_bar

            batches = list(iter_batches(acts, cfg.core.batch_size, device=device))
            with timer.phase("core"):
                return reconstruction_metrics(
                    sae,
                    progress_bar(None, "core (SAE)", "batch", iterable=batches),
                    d_sae,
                    cfg.core,
                )

        want_core = "core" in cfg.metrics or "reconstruction" in cfg.metrics
        d_in = int(prov["d_in"] or sae.cfg.d_in)

        def from_store(include_masked: bool):
            with timer.phase("eval_data"):
                acts, info = store_activations(
                    cfg.eval_store,
                    cfg.data.n_tokens,
                    include_masked=include_masked,
                    storage_options=cfg.storage_options,
                )
            _check_store(cfg.eval_store, info, prov, d_in)
            eval_info["store_masked" if include_masked else "store"] = info
            return acts

        with torch.no_grad():
            if want_core:
                # corpus activations are needed for CE/KL and when no store is given
                clean = (
                    get_data(False) if (cfg.eval_store is None or "core" in cfg.metrics) else None
                )
                if cfg.eval_store is not None:
                    metrics["core"] = core_on(from_store(False))
                else:
                    assert clean is not None
                    metrics["core"] = core_on(clean.acts_ND)
                if "core" in cfg.metrics:
                    assert clean is not None
                    lm = self._lm(model_spec, timer)
                    base_key = json.dumps([clean.meta.get("cache_key"), cfg.downstream.n_sequences])
                    with timer.phase("downstream"):
                        ds = downstream_metrics(
                            lm,
                            sae,
                            layer,
                            clean.input_ids_ST,
                            clean.attention_mask_ST,
                            clean.keep_ST,
                            cfg.downstream,
                            baseline=self._baseline(base_key),
                            clean_cache=self._clean_cache(base_key),
                        )
                    self._store_baseline(base_key, ds["baseline"])
                    metrics["core"]["downstream"] = ds
                if cfg.eval_masked:
                    if cfg.eval_store is not None:
                        metrics["core_masked"] = core_on(from_store(True))
                    else:
                        metrics["core_masked"] = core_on(get_data(True).acts_ND)
            if "absorption" in cfg.metrics:
                metrics["absorption"] = self._absorption(sae, model_spec, layer, timer)
            if "cooccurrence" in cfg.metrics:
                from masksae.evaluate.cooccurrence import cooccurrence_metrics

                clean_acts = get_data(False).acts_ND
                with timer.phase("cooccurrence"):
                    metrics["cooccurrence"] = cooccurrence_metrics(
                        sae, clean_acts, cfg.cooccurrence, metrics.get("absorption"), device
                    )
            sae_memo: dict = {}  # this SAE's pooled latents, shared by the probing metrics
            for name in PROBING_METRICS:
                if name in cfg.metrics:
                    metrics[name] = self._probing(
                        name, sae, model_spec, prov, meta, layer, timer, sae_memo
                    )
        timer.seconds["total"] = time.perf_counter() - t_start
        return make_result(checkpoint, prov, eval_info, metrics, timer.seconds)

    def _clean_cache(self, key: str) -> Any:
        """The in-memory clean log-prob cache of one evaluation set (None when disabled)."""
        from masksae.evaluate.downstream import CleanCache

        budget = self.cfg.downstream.clean_cache_mb << 20
        if budget == 0:
            return None
        if key not in self._clean_caches:
            self._clean_caches.clear()  # one evaluation set at a time keeps memory bounded
            self._clean_caches[key] = CleanCache(budget)
        return self._clean_caches[key]

    # the zero-ablation baseline depends on the data only: kept in memory and on disk
    def _baseline_path(self, key: str) -> Path | None:
        if self.cfg.cache_dir is None:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return Path(self.cfg.cache_dir) / f"baseline-{digest}.json"

    def _baseline(self, key: str) -> dict[str, float] | None:
        if key in self._baselines:
            return self._baselines[key]
        path = self._baseline_path(key)
        if path is not None and path.is_file():
            self._baselines[key] = json.loads(path.read_text())
            return self._baselines[key]
        return None

    def _store_baseline(self, key: str, baseline: dict[str, float]) -> None:
        if key not in self._baselines:
            self._baselines[key] = baseline
            path = self._baseline_path(key)
            if path is not None:
                atomic_write_json(path, baseline)

    def _absorption(
        self, sae: Any, model_spec: str, layer: int, timer: PhaseTimer
    ) -> dict[str, Any]:
        from masksae.evaluate import absorption

        acfg = self.cfg.absorption or absorption.AbsorptionConfig()
        lm = self._lm(model_spec, timer)
        cache = None if self.cfg.cache_dir is None else Path(self.cfg.cache_dir) / "absorption"
        with timer.phase("absorption"):
            return absorption.run(sae, lm, layer, acfg, cache)

    def _probing_config(self) -> Any:
        from masksae.evaluate.probing import probing_preset

        if self.cfg.probing is None:
            self.cfg.probing = probing_preset("demo")
        self.cfg.probing.validate()
        return self.cfg.probing

    def _probing(
        self,
        name: str,
        sae: Any,
        model_spec: str,
        prov: dict[str, Any],
        meta: dict[str, Any],
        layer: int,
        timer: PhaseTimer,
        sae_memo: dict | None = None,
    ) -> dict[str, Any]:
        """One probing metric's result section; LLM activations and LLM-activation probes
        come from ``cache_dir/probing`` when an earlier checkpoint made them."""
        from masksae.evaluate.probing import metric_runner
        from masksae.evaluate.probing.activations import ActivationCache
        from masksae.evaluate.probing.suite import ProbingContext, check_disjoint

        pcfg = self._probing_config()
        check_disjoint(meta.get("store") or {}, pcfg, (name,))
        if self._probing_cache is None:
            root = None if self.cfg.cache_dir is None else Path(self.cfg.cache_dir) / "probing"
            self._probing_cache = ActivationCache(root, pcfg.memory_mb)
        ctx = ProbingContext(
            cfg=pcfg,
            cache=self._probing_cache,
            model=model_spec,
            revision=prov["revision"],
            layer=layer,
            llm_dtype=self.cfg.llm_dtype,
            get_lm=lambda: self._lm(model_spec, timer),
            progress=self.cfg.progress,
            sae_memo={} if sae_memo is None else sae_memo,
        )
        with timer.phase(name):
            result = metric_runner(name)(sae, ctx)
        result["timings_s"] = dict(ctx.timer.seconds)
        result["cache_hits"] = dict(ctx.hits)
        result["settings"] = {
            "preset": pcfg.preset,
            "prepend_bos": pcfg.prepend_bos,
            "outlier_norm_factor": pcfg.outlier_norm_factor,
            "cache_dtype": pcfg.cache_dtype,
            "llm_dtype": self.cfg.llm_dtype,
        }
        return result


def _absorption_cached(root: Path, model: Any, revision: Any, layer: Any, acfg: Any) -> bool:
    """Whether ``root`` holds an absorption LLM stage for this model, revision, layer and
    vocabulary/probe settings (read from the entries' keys; the tokenizer and BOS parts of
    the key are not checked: an estimate)."""
    from masksae.evaluate.absorption.cache import KEY_FIELDS

    want = json.loads(json.dumps({n: getattr(acfg, n) for n in KEY_FIELDS}, default=str))
    for path in root.glob("absorption-*.json") if root.is_dir() else ():
        try:
            key = json.loads(path.read_text()).get("key") or {}
        except (OSError, ValueError):
            continue
        if (
            key.get("model_id") == str(model)
            and key.get("revision") == str(revision)
            and key.get("layer") == layer
            and key.get("config") == want
        ):
            return True
    return False


def _hub_commit(model_spec: str | None, recorded: str | None) -> str | None:
    """The recorded commit to load a Hugging Face Hub model at (None for bundled models,
    local folders, and revisions that are not a Hub commit sha)."""
    import re

    from masksae.models import BUNDLED_PREFIX

    if not model_spec or not recorded or model_spec.startswith(BUNDLED_PREFIX):
        return None
    if Path(model_spec).expanduser().exists() or not re.fullmatch(r"[0-9a-f]{40}", recorded):
        return None
    return recorded


def _check_store(path: str | Path, info: dict[str, Any], prov: dict[str, Any], d_in: int) -> None:
    """ConfigError when the store's width is not the SAE's; a warning when its model or
    layer differ from the checkpoint's."""
    if info["d_model"] != d_in:
        raise ConfigError(
            f"--eval-store {str(path)!r} holds {info['d_model']}-dim activations "
            f"but the SAE reads {d_in}: pass the store of the SAE's model/layer"
        )
    sprov = info.get("provenance") or {}
    for key in ("model", "layer"):
        if sprov.get(key) is not None and prov.get(key) is not None and sprov[key] != prov[key]:
            log.warning(
                "--eval-store %s has %s %r, the checkpoint %r", path, key, sprov[key], prov[key]
            )


def result_filename(checkpoint: Path, roots: Sequence[Path]) -> str:
    """A readable unique file name: the checkpoint path relative to its search root."""
    checkpoint = Path(checkpoint).resolve()
    for root in roots:
        root = Path(root).resolve()
        try:
            rel = checkpoint.relative_to(root.parent)
        except ValueError:
            continue
        return "__".join(rel.parts) + ".json"
    return checkpoint.name + ".json"


#: EvaluateConfig fields that do not change a result (where and how it is computed)
OPERATIONAL_FIELDS = frozenset({"cache_dir", "device", "progress", "storage_options", "overwrite"})
#: sub-configs recorded only when one of these metrics runs (others cannot change the result)
_METRIC_SETTINGS = {
    "core": ("core", "reconstruction"),
    "downstream": ("core",),
    "absorption": ("absorption",),
    "cooccurrence": ("cooccurrence",),
    "probing": PROBING_METRICS,
}


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """sha256[:16] of the checkpoint's config.json (step, tokens, store...) and the size of
    its weights: a run trained further or retrained gets a new fingerprint."""
    from masksae.train.checkpoint import WEIGHTS_FILE

    folder = Path(checkpoint)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    weights = folder / WEIGHTS_FILE
    digest.update(str(weights.stat().st_size if weights.is_file() else -1).encode())
    return digest.hexdigest()[:16]


def evaluation_settings(cfg: EvaluateConfig, checkpoint: str | Path) -> dict[str, Any]:
    """What determines a checkpoint's result (recorded in it as ``settings``): the metrics,
    the settings of those metrics, and the checkpoint's fingerprint. A rerun reuses a result
    whose recorded settings are equal."""
    from masksae.evaluate.absorption import AbsorptionConfig
    from masksae.evaluate.probing import probing_preset

    out: dict[str, Any] = {"checkpoint": checkpoint_fingerprint(checkpoint)}
    for f in fields(cfg):
        if f.name in OPERATIONAL_FIELDS:
            continue
        if f.name in _METRIC_SETTINGS and not set(_METRIC_SETTINGS[f.name]) & set(cfg.metrics):
            continue
        value = getattr(cfg, f.name)
        if value is None and f.name == "absorption":
            value = AbsorptionConfig()
        if value is None and f.name == "probing":
            value = probing_preset("demo")
        out[f.name] = to_dict(value) if is_dataclass(value) else value
    return json.loads(json.dumps(out, default=str))


def _differing(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Top-level settings that differ (``["no recorded settings"]`` for old results)."""
    if not isinstance(old, dict):
        return ["no recorded settings"]
    return sorted(k for k in {*old, *new} if old.get(k) != new.get(k))


def evaluate_checkpoints(
    checkpoints: Sequence[Path],
    out_dir: Path,
    cfg: EvaluateConfig,
    roots: Sequence[Path] = (),
    *,
    overwrite: bool | None = None,
) -> list[Path]:
    """Evaluate every checkpoint, writing ``out_dir/<name>.json``; return the files.

    A checkpoint whose result file exists with the same recorded settings
    (:func:`evaluation_settings`) is skipped unless ``overwrite`` (default
    ``cfg.overwrite``); one whose result has
    other settings is recomputed (and its file replaced), with a warning naming them.
    """
    overwrite = cfg.overwrite if overwrite is None else overwrite
    todo: list[tuple[Path, Path]] = []
    written: dict[Path, Path] = {}  # checkpoint -> result file
    for ckpt in checkpoints:
        path = Path(out_dir) / result_filename(ckpt, roots)
        if path.is_file() and not overwrite:
            try:
                recorded = json.loads(path.read_text()).get("settings")
            except (OSError, ValueError, AttributeError):
                recorded = None
            differ = _differing(recorded, evaluation_settings(cfg, ckpt))
            if not differ:
                log.info("skipping %s: %s (exists; --overwrite to redo)", ckpt, path)
                written[ckpt] = path
                continue
            log.warning(
                "recomputing %s: %s exists but its settings differ (%s)",
                ckpt,
                path,
                ", ".join(differ),
            )
        todo.append((ckpt, path))
    if todo:
        log.info("%s", work_estimate(cfg, [c for c, _ in todo], len(checkpoints) - len(todo)))
    evaluator = Evaluator(cfg) if todo else None
    for i, (ckpt, path) in enumerate(todo):
        log.info("evaluating %s (%d/%d)", ckpt, i + 1, len(todo))
        assert evaluator is not None
        doc = evaluator.evaluate(ckpt)
        atomic_write_json(path, doc)
        log.info("wrote %s (%.1fs)", path, doc["timings_s"]["total"])
        written[ckpt] = path
    return [written[c] for c in checkpoints]


def work_estimate(cfg: EvaluateConfig, checkpoints: Sequence[Path], skipped: int) -> str:
    """One line of what an evaluation will compute: checkpoints x metrics, the LLM tokens
    of each pass and which LLM work the cache already holds."""
    n = len(checkpoints)
    parts = [
        f"evaluate: {n} checkpoint(s) x {len(cfg.metrics)} metric(s) ({', '.join(cfg.metrics)})"
        + (f", {skipped} skipped (results exist)" if skipped else "")
    ]
    targets = set()
    for ckpt in checkpoints:
        prov = provenance_from_meta(json.loads((Path(ckpt) / "config.json").read_text()))
        targets.add((cfg.model_override or prov["model"], prov["revision"], prov["layer"]))
    want_core = {"core", "reconstruction"} & set(cfg.metrics)
    needs_data = (want_core and cfg.eval_store is None) or {"core", "cooccurrence"} & set(
        cfg.metrics
    )
    if needs_data:
        cached = sum(
            has_entry(cfg.cache_dir, key_fields(m, r, lay, replace(cfg.data, masked=False)))
            for m, r, lay in targets
            if m is not None and lay is not None
        )
        parts.append(
            f"eval activations: {cfg.data.n_tokens} LLM tokens per model/layer "
            f"({len(targets)} model/layer(s), {cached} cached)"
        )
    if "core" in cfg.metrics:
        tokens = cfg.downstream.n_sequences * cfg.data.context_length
        parts.append(
            f"CE/KL: {tokens} tokens x {n} checkpoint(s), 2 LLM passes each (clean and "
            "zero-ablation passes once per evaluation set, reused after the first)"
        )
    if "absorption" in cfg.metrics:
        from masksae.evaluate.absorption import AbsorptionConfig

        acfg = cfg.absorption or AbsorptionConfig()
        words = acfg.max_words_per_letter
        size = f"up to 26 x {words} words" if words else "the whole vocabulary"
        if cfg.cache_dir is None:
            where = "not cached (no --cache): once per run"
        else:
            root = Path(cfg.cache_dir) / "absorption"
            cached = sum(_absorption_cached(root, m, r, lay, acfg) for m, r, lay in targets)
            where = f"{cached} of {len(targets)} cached in {root}"
        parts.append(f"absorption: one LLM pass over {size} per model/layer, {where}")
    probing = [m for m in PROBING_METRICS if m in cfg.metrics]
    if probing:
        where = (
            f"cached in {Path(cfg.cache_dir) / 'probing'}"
            if cfg.cache_dir is not None
            else "kept in memory for this run"
        )
        parts.append(f"probing ({', '.join(probing)}): task texts through the LLM once, {where}")
    return "; ".join(parts)
