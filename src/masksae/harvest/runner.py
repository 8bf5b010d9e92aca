"""The harvest runner: corpus -> packed, masked sequences -> truncated forward -> store chunks.

A chunk is ``chunk_sequences`` whole sequences. On resume the corpus is re-tokenised
(deterministically) and the sequences of completed chunks are skipped without running the
model. Activations of position 0, of special tokens and of norm outliers (see
``masksae.harvest.outliers``) are stored but flagged ``excluded``; the store's reader skips
them by default (the policy is recorded in provenance ``excluded_token_policy``).
Forward passes run in the main thread while the store's background writer compresses and
writes the previous chunk, so compute and I/O overlap.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masksae.devices import dtype_name, resolve_dtype
from masksae.errors import ConfigError, CorpusError
from masksae.harvest.config import DEFAULT_CHUNK_TOKENS, HarvestConfig
from masksae.harvest.corpus import Corpus, CorpusSpec
from masksae.harvest.corruption import (
    Corruption,
    block_noise,
    corrupt_block,
    resolve_corruption,
    role_token_id,
    validate_corruption_settings,
)
from masksae.harvest.masking import (
    resolve_mask_token,
    special_token_ids,
    validate_mask_prob,
)
from masksae.harvest.outliers import (
    flag_norm_outliers,
    outlier_policy,
    row_norms,
    validate_outlier_factor,
)
from masksae.harvest.tokenize import pack_sequences, resolve_context_length, separator_id
from masksae.models import (
    BUNDLED_PREFIX,
    LoadedModel,
    capture_resid_post,
    load_model,
    tokenizer_id,
)
from masksae.models import validate_layer as _validate_layer

log = logging.getLogger(__name__)

HOOK = "resid_post"
KEEP_PACKED_TOKENS = 1 << 25
"""Largest harvest (tokens) whose packed sequences the corpus size check keeps for the run
(int32 ids: 128 MiB); larger ones are tokenised again, streaming, by the run."""


@dataclass
class HarvestResult:
    """What a harvest did."""

    out: Path | str
    """Store directory or URL."""
    total_tokens: int
    """Tokens in the finished store."""
    new_tokens: int
    """Tokens computed by this run (the rest were complete already)."""
    n_chunks: int
    """Chunks in the store."""
    skipped_chunks: int
    """Chunks found complete and skipped (resume)."""
    seconds: float
    """Wall time of the harvest loop."""
    masked_fraction: float
    """Fraction of tokens computed by this run that were masked (or randomly replaced)."""
    norm_outliers: int = 0
    """Tokens computed by this run that were flagged as norm outliers."""
    null_texts_skipped: int = 0
    """Corpus records with a null text field, skipped while reading the store's documents."""
    undecodable_bytes: int = 0
    """Bytes of the local corpus files read that were not UTF-8 (replaced by U+FFFD)."""
    corruption: str = "mask"
    """Corruption kind (HarvestConfig.corruption)."""
    deleted_fraction: float = 0.0
    """Deletion: deleted tokens / tokens of the sequences computed by this run."""
    noise_sigma: float = 0.0
    """Noise: the per-dimension standard deviation added to every usable token."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        """One line for the log and the CLI."""
        head = f"{self.out} holds {self.total_tokens} tokens in {self.n_chunks} chunks"
        if self.new_tokens == 0:
            return f"{head}; all were complete already, nothing to compute"
        if self.corruption == "delete":
            what = f"deleted fraction {self.deleted_fraction:.4f}"
        elif self.corruption == "noise":
            what = f"noise sigma {self.noise_sigma:.4g} added to every usable token"
        elif self.corruption == "mask":
            what = f"masked fraction {self.masked_fraction:.4f}"
        else:
            what = f"randomly replaced fraction {self.masked_fraction:.4f}"
        line = (
            f"{head} ({self.n_chunks - self.skipped_chunks} computed now, "
            f"{self.skipped_chunks} resumed) in {self.seconds:.1f} s, "
            f"{self.tokens_per_s:.0f} tok/s; of the tokens computed now, {what} and "
            f"{self.norm_outliers} norm outliers flagged"
        )
        if self.null_texts_skipped:
            line += f"; {self.null_texts_skipped} corpus records with a null text skipped"
        if self.undecodable_bytes:
            line += f"; {self.undecodable_bytes} undecodable corpus bytes replaced by U+FFFD"
        return line


@dataclass
class HarvestPlan:
    """Everything resolved and validated before any store is touched."""

    cfg: HarvestConfig
    lm: LoadedModel
    corpus: Corpus
    layer: int
    context_length: int
    mask_id: int
    mask_string: str
    special_ids: np.ndarray
    n_sequences: int
    chunk_sequences: int
    store_dtype: str
    outlier_norm_factor: float
    corruption: Corruption | None = None
    """Resolved corruption (None until :func:`plan_harvest` resolves it)."""
    corruption_record: dict[str, Any] | None = None
    """The provenance ``corruption`` table; None for plain masking (see
    masksae.storage.provenance)."""
    packed: np.ndarray | None = None
    """The packed sequences [n_sequences, context_length], kept from the corpus size check
    when they fit ``KEEP_PACKED_TOKENS`` (the run then does not tokenise them again)."""

    @property
    def total_tokens(self) -> int:
        return self.n_sequences * self.context_length

    def sequences(self) -> Iterator[np.ndarray]:
        """The packed (unmasked) sequences, in order, exactly ``n_sequences`` of them."""
        if self.packed is not None:
            return iter(self.packed)
        packed = pack_sequences(
            self.corpus, self.lm.tokenizer, self.context_length, prepend_bos=self.lm.prepend_bos
        )
        return itertools.islice(packed, self.n_sequences)

    def provenance(self) -> dict[str, Any]:
        """JSON-able description recorded in the store (resume requires equality)."""
        from masksae import __version__

        tok = self.lm.tokenizer
        return {
            "model": self.lm.model_id,
            "model_revision": self.lm.revision,
            "architecture": self.lm.architecture,
            "n_layers": self.lm.n_layers,
            "layer": self.layer,
            "hook": HOOK,
            "d_model": self.lm.d_model,
            "model_dtype": dtype_name(self.lm.dtype),
            "store_dtype": self.store_dtype,
            "context_length": self.context_length,
            "prepend_bos": self.lm.prepend_bos,
            "separator_token_id": separator_id(tok),
            "mask_prob": self.cfg.mask_prob,
            "mask_string": self.mask_string,
            "mask_token_id": self.mask_id,
            "seed": self.cfg.seed,
            "corpus": self.corpus.describe(),
            "tokenizer": tokenizer_id(self.lm),
            "tokenizer_class": type(tok).__name__,
            "vocab_size": len(tok),
            "special_token_ids": self.special_ids.tolist(),
            "n_sequences": self.n_sequences,
            "tokens_requested": self.cfg.tokens,
            "masksae_version": __version__,
            "outlier_norm_factor": self.outlier_norm_factor,
            "excluded_token_policy": outlier_policy(self.outlier_norm_factor),
            # only for corruptions other than plain masking: old stores keep their provenance
            **({"corruption": self.corruption_record} if self.corruption_record else {}),
        }

    def store_spec(self) -> Any:
        from masksae.storage import StoreSpec

        kwargs: dict[str, Any] = {}
        if self.cfg.compression is not None:
            kwargs["compression"] = self.cfg.compression
        return StoreSpec(
            d_model=self.lm.d_model,
            dtype=self.store_dtype,
            chunk_tokens=self.chunk_sequences * self.context_length,
            total_tokens=self.total_tokens,
            provenance=self.provenance(),
            **kwargs,
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} {value!r} is invalid: expected a positive integer")
    return value


def plan_harvest(
    cfg: HarvestConfig,
    *,
    lm: LoadedModel | None = None,
    check_corpus: bool = True,
    weights: bool = True,
    resolve: bool = True,
) -> HarvestPlan:
    """Validate ``cfg`` (loading the model unless ``lm`` is given) and resolve every default.

    ``check_corpus`` tokenises the corpus up front to refuse one that is too small (workers
    of a multi-device harvest skip it: their parent checked). ``weights=False`` plans on
    the model's config and tokenizer only (``load_model(weights=False)``), so every
    check that needs no weights runs before they are loaded; ``resolve=False`` leaves the
    corruption unresolved (noise calibration runs the model).
    """
    if not cfg.out:
        raise ConfigError("no output path given: use --out PATH")
    tokens = _positive_int(cfg.tokens, "--tokens")
    batch_size = _positive_int(cfg.batch_size, "--batch-size")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(
            f"--seed {cfg.seed!r} is invalid: expected an integer >= 0 (the mask draws are "
            "seeded by (seed, sequence index))"
        )
    validate_mask_prob(cfg.mask_prob)
    outlier_factor = validate_outlier_factor(cfg.outlier_norm_factor)
    store_dtype = dtype_name(resolve_dtype(cfg.store_dtype or cfg.dtype))
    corpus = Corpus(
        CorpusSpec(
            source=cfg.corpus,
            field=cfg.corpus_field,
            filters=tuple(cfg.corpus_filter),
            split=cfg.corpus_split,
            allow_undecodable=cfg.corpus_allow_undecodable,
            revision=cfg.dataset_revision,
            config_name=cfg.dataset_config,
        )
    )
    if cfg.compression is not None:  # a bad value is refused before the model loads
        from masksae.storage.codecs import parse_compression

        parse_compression(cfg.compression)
    if lm is None:
        lm = load_model(
            cfg.model, dtype=cfg.dtype, device=cfg.device, weights=weights, revision=cfg.revision
        )
    layer = lm.n_layers // 2 if cfg.layer is None else cfg.layer
    _validate_layer(lm, layer)
    context = resolve_context_length(
        cfg.context_length, lm.max_context, bundled=lm.model_id.startswith(BUNDLED_PREFIX)
    )
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or len(lm.tokenizer))
    validate_corruption_settings(cfg)
    if cfg.mask_token_role is not None:
        mask_id = role_token_id(lm.tokenizer, cfg.mask_token_role)
        mask_string = lm.tokenizer.decode([mask_id])
    else:
        mask_id, mask_string = resolve_mask_token(
            lm.tokenizer, cfg.mask_string, cfg.mask_token_id, vocab
        )
    if cfg.chunk_sequences is None:
        per_chunk = max(batch_size, DEFAULT_CHUNK_TOKENS // context // batch_size * batch_size)
    else:
        per_chunk = _positive_int(cfg.chunk_sequences, "--chunk-sequences")
    n_sequences = math.ceil(tokens / context)
    plan = HarvestPlan(
        cfg=cfg,
        lm=lm,
        corpus=corpus,
        layer=layer,
        context_length=context,
        mask_id=mask_id,
        mask_string=mask_string,
        special_ids=special_token_ids(lm.tokenizer),
        n_sequences=n_sequences,
        chunk_sequences=min(per_chunk, n_sequences),
        store_dtype=store_dtype,
        outlier_norm_factor=outlier_factor,
    )
    if check_corpus:
        _check_corpus_size(plan)
    if resolve:
        plan.corruption, plan.corruption_record = resolve_corruption(plan)
    return plan


def _calibration_needs_model(cfg: HarvestConfig) -> bool:
    """True when resolving the corruption runs the model (a noise harvest calibrating its
    sigma; a resumed one reuses the store's calibration, found only after planning)."""
    return cfg.corruption == "noise" and cfg.noise_sigma is None and cfg.mask_prob > 0


def _check_corpus_size(plan: HarvestPlan) -> None:
    """CorpusError up front if the corpus is empty, or (finite sources) too small."""
    packed = plan.sequences()
    streaming = plan.corpus.kind == "hub"  # only check that something comes out
    kept: list[np.ndarray] | None = None
    if streaming:
        count = 1 if next(packed, None) is not None else 0
    else:  # tokenised here anyway: kept for the run when small enough
        kept, count = [], 0
        for sequence in packed:
            count += 1
            if kept is not None:
                kept.append(sequence)
                if count * plan.context_length > KEEP_PACKED_TOKENS:
                    kept = None  # too many to hold: the run tokenises again
    if count == 0:
        raise CorpusError(
            f"corpus {plan.corpus.spec.source!r} yields no sequence of {plan.context_length} "
            "tokens (empty, filtered out, or too short): check --corpus, --corpus-field and "
            "--corpus-filter"
        )
    if not streaming and count < plan.n_sequences:
        available = count * plan.context_length
        raise CorpusError(
            f"corpus {plan.corpus.spec.source!r} holds only {count} sequences of "
            f"{plan.context_length} tokens ({available} tokens), fewer than --tokens "
            f"{plan.cfg.tokens} needs: use --tokens {available} or less, or a larger corpus"
        )
    if kept is not None:
        plan.packed = np.stack(kept)


def run_harvest(
    cfg: HarvestConfig, *, lm: LoadedModel | None = None, progress: bool = True
) -> HarvestResult:
    """Harvest (or resume harvesting) the store described by ``cfg``.

    Under a launcher (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) this process
    is one rank of a distributed harvest; with several ``cfg.devices`` one rank per device
    is spawned here. Both run :mod:`masksae.harvest.parallel`; the store is identical to a
    single-process run.
    """
    from masksae import distributed
    from masksae.allocator import keep_freed_memory

    keep_freed_memory()  # the CPU forward's temporaries stay mapped between batches
    if not progress:  # --no-progress also silences transformers' weight-loading bar
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if len(cfg.devices) > 1:
        from masksae.harvest.parallel import harvest_on_device

        if lm is not None:
            raise ConfigError(
                "a multi-device harvest loads the model in each rank: "
                "do not pass a loaded model (lm) with several devices"
            )
        if distributed.launched_world() > 1:
            raise ConfigError(
                "--devices spawns its own ranks: do not combine it with torchrun or "
                "accelerate launch (use --device there; each rank takes its local GPU)"
            )
        done = precheck(dataclasses.replace(cfg, devices=()))
        if done is not None:
            log_done(done)
            return done
        return distributed.spawn_local(
            harvest_on_device, (dataclasses.replace(cfg, devices=()), progress), cfg.devices
        )
    if len(cfg.devices) == 1:
        cfg = dataclasses.replace(cfg, device=cfg.devices[0], devices=())
    ctx = distributed.init()
    try:
        if ctx.distributed:
            from masksae.harvest.parallel import run_distributed_harvest

            return run_distributed_harvest(cfg, ctx, lm=lm, progress=progress)
        return _run_single(cfg, lm=lm, progress=progress)
    finally:
        distributed.shutdown(ctx)


def _run_single(cfg: HarvestConfig, *, lm: LoadedModel | None, progress: bool) -> HarvestResult:
    from tqdm.auto import tqdm

    from masksae.storage import StoreWriter

    plan = _plan_before_weights(cfg, lm)
    if plan.lm.device.type == "meta":
        existing = _existing_chunks(plan)
        if existing is not None and len(existing) == plan.store_spec().n_chunks:
            # complete: nothing to compute, and no weights or corpus pass needed to say so
            result = make_result(plan, ChunkCounts(), len(existing), len(existing), 0.0)
            log_done(result)
            return result
        _check_corpus_size(plan)
        plan.lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
    spec = plan.store_spec()
    writer = StoreWriter.open(
        cfg.out, spec, storage_options=cfg.storage_options, break_lock=cfg.break_lock
    )
    completed = writer.completed_chunks
    n_chunks = writer.n_chunks
    done_tokens = sum(_chunk_len(spec, i) for i in completed)
    log_start(plan, n_chunks, len(completed))
    bar = tqdm(
        total=plan.total_tokens,
        initial=done_tokens,
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    start = time.perf_counter()
    with writer:
        counts = harvest_chunks(plan, writer, owned=lambda _i: True, on_tokens=bar.update)
    seconds = time.perf_counter() - start
    bar.close()
    result = make_result(plan, counts, n_chunks, len(completed), seconds)
    log_done(result)
    return result


def _plan_before_weights(cfg: HarvestConfig, lm: LoadedModel | None) -> HarvestPlan:
    """The plan of a single-process harvest, made before the model's weights are loaded
    when possible (from its config and tokenizer; ``lm.device`` is "meta"), so that a bad --layer, --compression or corpus, a
    provenance mismatch with the store at --out, or a store already complete is reported
    at once. With ``lm`` given, or a noise harvest that must calibrate on the model, the
    weights are loaded first (the plan's model is then real)."""
    if lm is not None:
        return plan_harvest(cfg, lm=lm)
    if not _calibration_needs_model(cfg):
        return plan_harvest(cfg, check_corpus=False, weights=False)
    plan = plan_harvest(cfg, check_corpus=False, weights=False, resolve=False)
    from masksae.harvest.corruption import recorded_noise_record

    record = recorded_noise_record(plan)
    if record is not None:  # a resume: the store's own calibration, no model needed
        plan.corruption, plan.corruption_record = resolve_corruption(plan)
        return plan
    _check_corpus_size(plan)
    plan.lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
    plan.corruption, plan.corruption_record = resolve_corruption(plan)
    return plan


def precheck(cfg: HarvestConfig, *, check_corpus: bool = False) -> HarvestResult | None:
    """Every check that needs no weights (as :func:`_run_single` makes them; the corpus size
    too with ``check_corpus``), and the result when the store at --out is already complete
    (nothing to compute); None otherwise. Run before spawning the ranks of a multi-device
    harvest, and by every rank of a distributed one before any of them loads the weights."""
    if _calibration_needs_model(cfg):  # the spec needs the calibration: validate only
        plan_harvest(cfg, check_corpus=check_corpus, weights=False, resolve=False)
        return None
    plan = plan_harvest(cfg, check_corpus=False, weights=False)
    existing = _existing_chunks(plan)
    if existing is not None and len(existing) == plan.store_spec().n_chunks:
        return make_result(plan, ChunkCounts(), len(existing), len(existing), 0.0)
    if check_corpus:
        _check_corpus_size(plan)
    return None


def _existing_chunks(plan: HarvestPlan) -> set[int] | None:
    """Complete chunks of the store at --out (None: no store yet); ProvenanceMismatchError
    when it was made with other settings. Read-only: no lock, nothing created."""
    from masksae.storage.writer import existing_chunks

    return existing_chunks(
        plan.cfg.out, plan.store_spec(), storage_options=plan.cfg.storage_options
    )


@dataclass
class ChunkCounts:
    """Token counts of the chunks one process computed."""

    tokens: int = 0
    """Tokens computed."""
    masked: int = 0
    """Of which masked."""
    outliers: int = 0
    """Of which flagged as norm outliers."""
    deleted: int = 0
    """Tokens deleted from the sequences computed (corruption ``delete``)."""

    def add(self, other: ChunkCounts) -> None:
        self.tokens += other.tokens
        self.masked += other.masked
        self.outliers += other.outliers
        self.deleted += other.deleted


def harvest_chunks(
    plan: HarvestPlan,
    writer: Any,
    *,
    owned: Callable[[int], bool],
    on_tokens: Callable[[int], Any],
    before_chunk: Callable[[int], None] | None = None,
) -> ChunkCounts:
    """Compute and write every chunk that is ``owned`` and not complete in ``writer``.

    The corpus is always tokenised from the start (deterministic), skipping the sequences of
    chunks that are complete or not owned. ``on_tokens(n)`` is called after each forward
    batch; ``before_chunk(index)`` before computing each chunk (may raise to stop).
    """
    completed = writer.completed_chunks
    sequences = _prefetch(plan.sequences(), depth=4 * plan.chunk_sequences)
    counts = ChunkCounts()
    buffers = _ChunkBuffers.allocate(plan)
    for index in range(writer.n_chunks):
        n_seq = min(plan.chunk_sequences, plan.n_sequences - index * plan.chunk_sequences)
        block = list(itertools.islice(sequences, n_seq))
        if len(block) != n_seq:  # the corpus changed since the size check
            raise CorpusError(
                f"corpus {plan.cfg.corpus!r} ended early at chunk {index}: it changed during "
                "the harvest; rerun to resume"
            )
        if index in completed or not owned(index):
            continue
        if before_chunk is not None:
            before_chunk(index)
        data, n_outliers, n_deleted = _harvest_chunk(
            plan, np.stack(block), index * plan.chunk_sequences, on_tokens, buffers
        )
        extra = {"n_norm_outliers": n_outliers}
        if plan.cfg.corruption == "delete":
            extra["n_deleted"] = n_deleted
        writer.write_chunk(index, data, record_extra=extra)
        counts.add(ChunkCounts(len(data), int(data.masked.sum()), n_outliers, n_deleted))
    return counts


def log_start(plan: HarvestPlan, n_chunks: int, n_completed: int) -> None:
    """Log what a harvest is about to do."""
    cfg = plan.cfg
    log.info(
        "harvest %s layer %d (%s) -> %s: %d tokens = %d sequences x %d, %d chunks "
        "(%d complete), %s p=%.3g, mask %r (id %d), seed %d, outlier norm factor %g",
        plan.lm.model_id,
        plan.layer,
        HOOK,
        cfg.out,
        plan.total_tokens,
        plan.n_sequences,
        plan.context_length,
        n_chunks,
        n_completed,
        cfg.corruption,
        cfg.mask_prob,
        plan.mask_string,
        plan.mask_id,
        cfg.seed,
        plan.outlier_norm_factor,
    )


def make_result(
    plan: HarvestPlan, counts: ChunkCounts, n_chunks: int, skipped: int, seconds: float
) -> HarvestResult:
    """The HarvestResult of a finished harvest."""
    return HarvestResult(
        out=plan.cfg.out if "://" in str(plan.cfg.out) else Path(plan.cfg.out),
        total_tokens=plan.total_tokens,
        new_tokens=counts.tokens,
        n_chunks=n_chunks,
        skipped_chunks=skipped,
        seconds=seconds,
        masked_fraction=counts.masked / counts.tokens if counts.tokens else 0.0,
        norm_outliers=counts.outliers,
        null_texts_skipped=plan.corpus.stats.null_texts,
        undecodable_bytes=sum(plan.corpus.stats.undecodable_bytes.values()),
        corruption=plan.cfg.corruption,
        deleted_fraction=counts.deleted / counts.tokens if counts.tokens else 0.0,
        noise_sigma=plan.corruption.noise_sigma if plan.corruption is not None else 0.0,
    )


def log_done(result: HarvestResult) -> None:
    """Log the summary of a finished harvest."""
    log.info("harvest done: %s", result.summary())


def _prefetch(items: Iterator[np.ndarray], depth: int) -> Iterator[np.ndarray]:
    """Produce ``items`` on a background thread (tokenising overlaps the forward passes)."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()

    def produce() -> None:
        try:
            for item in items:
                buffer.put(item)
            buffer.put(done)
        except BaseException as exc:  # handed to the consumer
            buffer.put(exc)

    threading.Thread(target=produce, name="masksae-harvest-tokenise", daemon=True).start()
    while True:
        item = buffer.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _chunk_len(spec: Any, index: int) -> int:
    lo, hi = spec.chunk_bounds(index)
    return hi - lo


@dataclass
class _ChunkBuffers:
    """Host buffers one chunk's activations and norms are gathered into, reused for every
    chunk (the writer copies what it is handed): no chunk-sized allocation per chunk, and on
    CUDA page-locked memory, which the device copies into directly."""

    activations: torch.Tensor
    norms: torch.Tensor

    @classmethod
    def allocate(cls, plan: HarvestPlan) -> _ChunkBuffers:
        rows = plan.chunk_sequences * plan.context_length
        pinned = torch.device(plan.lm.device).type == "cuda"
        return cls(
            torch.empty((rows, plan.lm.d_model), dtype=plan.lm.dtype, pin_memory=pinned),
            torch.empty(rows, dtype=torch.float32, pin_memory=pinned),
        )


def _harvest_chunk(
    plan: HarvestPlan,
    ids_ST: np.ndarray,
    first_seq: int,
    on_tokens: Callable[[int], Any],
    buffers: _ChunkBuffers,
) -> tuple[Any, int, int]:
    """Corrupt, run the truncated forward in batches, flag norm outliers, and assemble one
    chunk's ChunkData (its activations and norms views of ``buffers``); returns it with the
    numbers of norm outliers flagged and of tokens deleted."""
    from masksae.storage import ChunkData

    assert plan.corruption is not None
    n_seq, length = ids_ST.shape
    seq_idx_S = np.arange(first_seq, first_seq + n_seq, dtype=np.int64)
    block = corrupt_block(ids_ST, seq_idx_S, plan.corruption, plan.special_ids)
    noisy = plan.corruption.kind == "noise" and plan.corruption.noise_sigma > 0
    acts = buffers.activations[: n_seq * length]
    norms = buffers.norms[: n_seq * length]
    input_ids = torch.from_numpy(block.ids.astype(np.int64))
    attention = torch.ones_like(input_ids)
    batch = plan.cfg.batch_size
    for lo in range(0, n_seq, batch):
        hi = min(lo + batch, n_seq)
        h_BTD = capture_resid_post(plan.lm, input_ids[lo:hi], attention[lo:hi], plan.layer)
        h_ND = h_BTD.reshape(-1, plan.lm.d_model)
        if noisy:  # drawn on the CPU (device-independent), added in float32
            noise = block_noise(
                seq_idx_S[lo:hi], block.excluded[lo:hi], plan.lm.d_model, plan.corruption
            )
            h_ND = (h_ND.float().cpu() + torch.from_numpy(noise)).to(plan.lm.dtype)
        acts[lo * length : hi * length].copy_(h_ND)
        norms[lo * length : hi * length].copy_(row_norms(h_ND))
        on_tokens((hi - lo) * length)
    excluded_N = block.excluded.reshape(-1)
    outliers_N = flag_norm_outliers(norms, excluded_N, plan.outlier_norm_factor)
    data = ChunkData(
        activations=acts,
        token_ids=block.ids.reshape(-1),
        masked=block.masked.reshape(-1),
        excluded=excluded_N | outliers_N,
        seq_index=np.repeat(seq_idx_S, length),
        position=block.position.reshape(-1),
    )
    return data, int(outliers_N.sum()), block.n_deleted
