"""Export native checkpoints to the SAELens and dictionary_learning formats.

SAELens (``cfg.json`` + ``sae_weights.safetensors``): BatchTopK and MatryoshkaBatchTopK
are written as ``jumprelu`` SAEs whose per-latent threshold is the learned scalar
threshold, which is exactly their inference rule (f = relu(pre) * (pre > theta)). TopK is
written as ``topk`` (with ``k``), ReLU as ``standard``, JumpReLU as ``jumprelu``.

dictionary_learning (``ae.pt`` state_dict + ``config.json`` {"trainer", "buffer"}): each
architecture in the state_dict layout of the reference class that loads it (its
``from_pretrained`` and SAEBench's ``load_dictionary_learning_*_sae``), see ``DL_LAYOUTS``:
the classes built on ``nn.Linear`` (BatchTopKSAE, AutoEncoderTopK, AutoEncoder) keep
``encoder.weight`` [F, D], ``encoder.bias`` [F] and ``decoder.weight`` [D, F]; the ones built
on parameters (MatryoshkaBatchTopKSAE, JumpReluAutoEncoder) keep ``W_enc`` [D, F] and
``W_dec`` [F, D].

Both exports hold float32 weights acting on raw activations, decoder rows of unit norm
and a non-negative threshold (what SAEBench requires). ``load_saelens_export`` and
``load_dictionary_learning_export`` are small reference loaders implementing each
format's own forward rule (used by the round-trip tests).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from masksae.atomic import atomic_write, atomic_write_json
from masksae.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FORMATS = ("saelens", "dictionary_learning")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
DL_WEIGHTS = "ae.pt"
DL_CFG = "config.json"
_BATCH_TOPK_FAMILY = ("batch_topk", "matryoshka_batch_topk")


@dataclass(frozen=True)
class DLLayout:
    """How dictionary_learning's class for one architecture names its weights."""

    trainer_class: str
    """``config.json`` trainer.trainer_class (SAEBench's loaders dispatch on it)."""
    dict_class: str
    """The ``Dictionary`` subclass whose ``from_pretrained`` loads the ``ae.pt``."""
    linear: bool
    """True: nn.Linear encoder/decoder (``encoder.weight`` [F, D], ``encoder.bias``,
    ``decoder.weight`` [D, F]); False: ``W_enc`` [D, F], ``b_enc``, ``W_dec`` [F, D]."""
    b_dec_key: str
    """Name of the decoder bias (``bias`` in AutoEncoder, ``b_dec`` elsewhere)."""
    buffers: tuple[str, ...]
    """Other state_dict entries: ``k`` (int32 scalar), ``threshold`` (fp32 scalar, or [F]
    for JumpReLU), ``group_sizes`` (int64 [G])."""


#: dictionary_learning's classes (dictionary.py, trainers/batch_top_k.py, top_k.py,
#: matryoshka_batch_top_k.py), one per architecture of ours.
DL_LAYOUTS = {
    "batch_topk": DLLayout("BatchTopKTrainer", "BatchTopKSAE", True, "b_dec", ("k", "threshold")),
    "matryoshka_batch_topk": DLLayout(
        "MatryoshkaBatchTopKTrainer",
        "MatryoshkaBatchTopKSAE",
        False,
        "b_dec",
        ("k", "threshold", "group_sizes"),
    ),
    "topk": DLLayout("TopKTrainer", "AutoEncoderTopK", True, "b_dec", ("k", "threshold")),
    "relu": DLLayout("StandardTrainer", "AutoEncoder", True, "bias", ()),
    "jumprelu": DLLayout("JumpReluTrainer", "JumpReluAutoEncoder", False, "b_dec", ("threshold",)),
}
_DL_BY_CLASS = {layout.dict_class: layout for layout in DL_LAYOUTS.values()}


def _prov(meta: dict[str, Any], *keys: str, default: Any = None) -> Any:
    store = meta.get("store") or {}
    for key in keys:
        if store.get(key) is not None:
            return store[key]
    return default


def _hook_name(meta: dict[str, Any], layer: int | None) -> str:
    hook = _prov(meta, "hook_name", "hook")
    if isinstance(hook, str) and hook.startswith("blocks."):
        return hook
    return f"blocks.{layer if layer is not None else 0}.hook_resid_post"


def _load(run_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    from masksae.train.checkpoint import load_sae

    return load_sae(run_dir)


def _check_weights(sae: Any) -> dict[str, Tensor]:
    """Float32 CPU copies of the common parameters, with unit decoder rows enforced."""
    W_dec = sae.W_dec.detach().float().cpu().clone()
    norms = W_dec.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise CheckpointError(
            f"decoder rows are not unit norm (range {norms.min():.4g}..{norms.max():.4g}); "
            "the checkpoint was not written by masksae train"
        )
    return {
        "W_enc": sae.W_enc.detach().float().cpu().contiguous().clone(),
        "b_enc": sae.b_enc.detach().float().cpu().contiguous().clone(),
        "W_dec": W_dec.contiguous(),
        "b_dec": sae.b_dec.detach().float().cpu().contiguous().clone(),
    }


def _scalar_threshold(sae: Any) -> float:
    theta = float(sae.threshold)
    if theta < 0:
        raise CheckpointError(
            f"the {sae.cfg.architecture} SAE has no learned inference threshold yet "
            f"(threshold_start_step = {sae.cfg.threshold_start_step}): resume training past "
            "that step (masksae train ... --resume), or retrain with a lower one "
            "(--sae.threshold-start-step N, or threshold_start_step in the [sae] table)"
        )
    return theta


def export_saelens(
    run_dir: str | Path, out_dir: str | Path, *, hook_name: str | None = None
) -> Path:
    """Write ``run_dir``'s SAE as a SAELens directory (cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import save_file

    sae, meta = _load(run_dir)
    arch = sae.cfg.architecture
    tensors = _check_weights(sae)
    F = sae.cfg.d_sae
    extra: dict[str, Any] = {}
    if arch in _BATCH_TOPK_FAMILY:
        sl_arch = "jumprelu"
        tensors["threshold"] = torch.full((F,), _scalar_threshold(sae), dtype=torch.float32)
    elif arch == "topk":
        sl_arch = "topk"
        extra["k"] = int(sae.cfg.k)
    elif arch == "relu":
        sl_arch = "standard"
    elif arch == "jumprelu":
        sl_arch = "jumprelu"
        theta = sae.threshold if hasattr(sae, "threshold") else sae.log_threshold.exp()
        tensors["threshold"] = theta.detach().float().cpu().reshape(F).clamp_min(0).clone()
    else:
        raise ConfigError(
            f"SAELens export: architecture {arch!r} is not supported; "
            f"supported: {list(_BATCH_TOPK_FAMILY) + ['topk', 'relu', 'jumprelu']}"
        )
    layer = _prov(meta, "layer", "hook_layer")
    model_name = _prov(meta, "model_name", "model", "model_id", default="unknown")
    hook = hook_name or _hook_name(meta, layer)
    context = _prov(meta, "context_length", "context_size")
    dataset = _prov(meta, "corpus", "dataset", "dataset_path", default="")
    cfg = {
        "architecture": sl_arch,
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(F),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(getattr(sae, "subtract_b_dec_from_input", True)),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "activation_fn_str": "topk" if sl_arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": extra["k"]} if sl_arch == "topk" else {},
        "finetuning_scaling_factor": False,
        "model_name": model_name,
        "hook_name": hook,
        "hook_layer": int(layer) if layer is not None else 0,
        "hook_head_index": None,
        "context_size": context,
        "prepend_bos": bool(_prov(meta, "prepend_bos", default=True)),
        "dataset_path": dataset if isinstance(dataset, str) else json.dumps(dataset),
        "dataset_trust_remote_code": False,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        **extra,
        "metadata": {
            "model_name": model_name,
            "hook_name": hook,
            "hook_head_index": None,
            "context_size": context,
            "prepend_bos": bool(_prov(meta, "prepend_bos", default=True)),
            "dataset_path": dataset if isinstance(dataset, str) else json.dumps(dataset),
            "masksae": {
                "architecture": arch,
                "sae": meta["sae"],
                "store": meta.get("store"),
                "store_fingerprint": meta.get("store_fingerprint"),
                "step": meta.get("step"),
                "tokens": meta.get("tokens"),
                "mask_prob": _prov(meta, "mask_prob", "p"),
            },
        },
    }
    with _writing(out_dir, "saelens"):
        out = _prepare_out(out_dir, (SAELENS_WEIGHTS, SAELENS_CFG), "saelens")
        atomic_write(out / SAELENS_WEIGHTS, lambda p: save_file(tensors, str(p)))
        atomic_write_json(out / SAELENS_CFG, cfg)
    log.info("exported %s as SAELens %s to %s", run_dir, sl_arch, out)
    return out


def dl_state_dict(sae: Any) -> dict[str, Tensor]:
    """``sae``'s weights in the state_dict layout of its dictionary_learning class."""
    arch = sae.cfg.architecture
    layout = DL_LAYOUTS[arch]
    w = _check_weights(sae)
    state: dict[str, Tensor] = {}
    if layout.linear:
        state["encoder.weight"] = w["W_enc"].t().contiguous()
        state["encoder.bias"] = w["b_enc"]
        state["decoder.weight"] = w["W_dec"].t().contiguous()
    else:
        state["W_enc"], state["b_enc"], state["W_dec"] = w["W_enc"], w["b_enc"], w["W_dec"]
    state[layout.b_dec_key] = w["b_dec"]
    if "k" in layout.buffers:
        state["k"] = torch.tensor(int(sae.cfg.k), dtype=torch.int)
    if "threshold" in layout.buffers:
        if arch in _BATCH_TOPK_FAMILY:
            state["threshold"] = torch.tensor(_scalar_threshold(sae), dtype=torch.float32)
        elif arch == "jumprelu":
            state["threshold"] = sae.threshold.detach().float().cpu().clamp_min(0).clone()
        else:  # TopK: -1 = "no inference threshold", the reference's initial value
            state["threshold"] = torch.tensor(-1.0, dtype=torch.float32)
    if "group_sizes" in layout.buffers:
        state["group_sizes"] = torch.tensor(list(sae.cfg.group_sizes))
    return state


def _dl_trainer_config(sae: Any, meta: dict[str, Any], layout: DLLayout) -> dict[str, Any]:
    """``config.json``'s trainer table: the keys the reference trainer's ``config`` has."""
    cfg = sae.cfg
    train = meta.get("train", {})
    steps = meta.get("step")
    trainer: dict[str, Any] = {
        "trainer_class": layout.trainer_class,
        "dict_class": layout.dict_class,
        "activation_dim": int(cfg.d_in),
        "dict_size": int(cfg.d_sae),
        "lr": train.get("lr"),
        "steps": steps,
        "warmup_steps": train.get("warmup_steps"),
        "decay_start": int(train.get("decay_start_frac", 1.0) * steps) if steps else None,
        "seed": train.get("seed"),
        "device": "cpu",
        "layer": _prov(meta, "layer"),
        "lm_name": _prov(meta, "model_name", "model", "model_id"),
        "submodule_name": _prov(meta, "hook_name", "hook"),
        "wandb_name": meta.get("run_name"),
    }
    arch = cfg.architecture
    if arch in ("topk", *_BATCH_TOPK_FAMILY):
        trainer.update(
            {"k": int(cfg.k), "auxk_alpha": cfg.auxk_alpha, "top_k_aux": int(cfg.d_in) // 2}
        )
    if arch in _BATCH_TOPK_FAMILY:
        trainer["threshold_beta"] = cfg.threshold_beta
        trainer["threshold_start_step"] = cfg.threshold_start_step
    if arch == "matryoshka_batch_topk":
        trainer["group_fractions"] = list(cfg.group_fractions)
        trainer["group_weights"] = list(cfg.group_weights)
        trainer["group_sizes"] = list(cfg.group_sizes)
    if arch == "relu":
        trainer["l1_penalty"] = cfg.l1_coefficient
        trainer["sparsity_warmup_steps"] = int(cfg.l1_warmup_frac * steps) if steps else None
    if arch == "jumprelu":
        trainer["bandwidth"] = cfg.bandwidth
        trainer["sparsity_penalty"] = cfg.sparsity_coefficient
        trainer["sparsity_warmup_steps"] = cfg.sparsity_warmup_steps
        trainer["target_l0"] = cfg.target_l0
    return trainer


def export_dictionary_learning(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``run_dir``'s SAE in the dictionary_learning layout (ae.pt + config.json)."""
    sae, meta = _load(run_dir)
    arch = sae.cfg.architecture
    if arch not in DL_LAYOUTS:
        raise ConfigError(
            f"dictionary_learning export supports {sorted(DL_LAYOUTS)}, not {arch!r}; "
            "use --format saelens for this SAE"
        )
    layout = DL_LAYOUTS[arch]
    state = dl_state_dict(sae)
    trainer = _dl_trainer_config(sae, meta, layout)
    train = meta.get("train", {})
    buffer = {
        "d_submodule": int(sae.cfg.d_in),
        "io": "out",
        "ctx_len": _prov(meta, "context_length", "context_size"),
        "out_batch_size": train.get("batch_size"),
        "device": "cpu",
        "masksae_store": {
            "path": meta.get("store_path"),
            "fingerprint": meta.get("store_fingerprint"),
            "provenance": meta.get("store"),
        },
    }
    with _writing(out_dir, "dictionary_learning"):
        out = _prepare_out(out_dir, (DL_WEIGHTS, DL_CFG), "dictionary_learning")
        atomic_write(out / DL_WEIGHTS, lambda p: torch.save(state, p))
        atomic_write_json(out / DL_CFG, {"trainer": trainer, "buffer": buffer})
    log.info("exported %s as dictionary_learning %s to %s", run_dir, layout.dict_class, out)
    return out


@contextmanager
def _writing(out_dir: str | Path, fmt: str) -> Iterator[None]:
    """Turn a failure to write the export (read-only or full disk, no permission) into one
    CheckpointError line; the atomic writes leave no partial file behind."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        reason = (reason.strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"cannot write the {fmt} export to {str(out_dir)!r}: {reason}: choose a writable "
            "--out with free space"
        ) from exc


def _prepare_out(out_dir: str | Path, own_files: tuple[str, ...], fmt: str) -> Path:
    """Create ``out_dir``; refuse one holding anything but an earlier export of ``fmt``
    (which is replaced), so exports never mix with other files."""
    out = Path(out_dir)
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in own_files)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise CheckpointError(
                f"export folder {str(out)!r} already holds other files ({shown}); a {fmt} "
                f"export needs an empty folder (or one holding an earlier {fmt} export): "
                "choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def export(run_dir: str | Path, fmt: str, out_dir: str | Path) -> Path:
    """Dispatch on ``fmt`` (``saelens`` | ``dictionary_learning``)."""
    if fmt == "saelens":
        return export_saelens(run_dir, out_dir)
    if fmt == "dictionary_learning":
        return export_dictionary_learning(run_dir, out_dir)
    raise ConfigError(f"unknown export format {fmt!r}: expected one of {list(FORMATS)}")


# ---------------------------------------------------------------------------- reference loaders
@dataclass
class ExportedSAE:
    """Minimal forward of an exported SAE, following the target library's own rules."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    rule: str
    """'jumprelu' | 'standard' | 'topk' | 'dl_batch_topk'."""
    threshold: Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True

    def encode(self, x_BD: Tensor) -> Tensor:
        x = x_BD - self.b_dec if self.apply_b_dec_to_input else x_BD
        pre = x @ self.W_enc + self.b_enc
        if self.rule == "jumprelu":  # SAELens: relu(pre) * (pre > threshold)
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)
        if self.rule == "dl_batch_topk":  # dictionary_learning, use_threshold=True
            f = torch.relu(pre)
            assert self.threshold is not None
            return f * (f > self.threshold)
        if self.rule == "topk":
            assert self.k is not None
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return torch.relu(pre)

    def decode(self, f_BF: Tensor) -> Tensor:
        return f_BF @ self.W_dec + self.b_dec


def load_saelens_export(path: str | Path) -> tuple[ExportedSAE, dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / SAELENS_CFG).read_text())
    w = load_file(str(path / SAELENS_WEIGHTS))
    rule = {"jumprelu": "jumprelu", "standard": "standard", "topk": "topk"}[cfg["architecture"]]
    sae = ExportedSAE(
        w["W_enc"],
        w["b_enc"],
        w["W_dec"],
        w["b_dec"],
        rule,
        threshold=w.get("threshold"),
        k=cfg.get("k"),
        apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
    )
    return sae, cfg


def load_dictionary_learning_export(path: str | Path) -> tuple[ExportedSAE, dict[str, Any]]:
    """Read an ``ae.pt`` + ``config.json`` in any layout of ``DL_LAYOUTS`` (by dict_class)."""
    path = Path(path)
    cfg = json.loads((path / DL_CFG).read_text())
    state = torch.load(path / DL_WEIGHTS, map_location="cpu", weights_only=True)
    dict_class = cfg["trainer"]["dict_class"]
    layout = _DL_BY_CLASS.get(dict_class)
    if layout is None:
        raise CheckpointError(
            f"{path / DL_CFG}: dict_class {dict_class!r} is not one of {sorted(_DL_BY_CLASS)}"
        )
    if layout.linear:
        W_enc, b_enc = state["encoder.weight"].t(), state["encoder.bias"]
        W_dec = state["decoder.weight"].t()
    else:
        W_enc, b_enc, W_dec = state["W_enc"], state["b_enc"], state["W_dec"]
    rule = {
        "BatchTopKSAE": "dl_batch_topk",
        "MatryoshkaBatchTopKSAE": "dl_batch_topk",
        "AutoEncoderTopK": "topk",
        "AutoEncoder": "standard",
        "JumpReluAutoEncoder": "jumprelu",
    }[dict_class]
    sae = ExportedSAE(
        W_enc,
        b_enc,
        W_dec,
        state[layout.b_dec_key],
        rule,
        threshold=state.get("threshold"),
        k=int(state["k"]) if "k" in state else None,
        apply_b_dec_to_input=dict_class != "JumpReluAutoEncoder",
    )
    return sae, cfg
