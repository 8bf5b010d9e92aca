"""Load a causal LM + tokenizer from a Hub id, a local directory or a bundled GGUF."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from masksae.devices import resolve_device, resolve_dtype
from masksae.errors import ModelError
from masksae.models.bundled import BUNDLED_PREFIX, resolve_bundled
from masksae.models.hooks import get_blocks

log = logging.getLogger(__name__)

OFFLINE_HINT = "offline? use bundled:smollm2-135m or a local path"
DEFAULT_MODEL = "bundled:smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM ready for hooking, with what provenance needs to know about it."""

    model: Any
    """A transformers *ForCausalLM, eval mode, on ``device`` (a :class:`ConfigOnly` when
    loaded with ``weights=False``)."""
    tokenizer: Any
    """The matching ``PreTrainedTokenizerBase``."""
    model_id: str
    """The spec the user gave ("bundled:smollm2-135m", a Hub id, a path)."""
    revision: str
    """Hub commit, GGUF sha256 (bundled) or "local:<hash of config + weights index>"."""
    architecture: str
    """``config.model_type``: "gpt_neox", "gemma2", "gemma3_text", "llama", "gpt2", ..."""
    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual-stream width."""
    max_context: int | None
    """``max_position_embeddings`` (None when the model has no limit)."""
    prepend_bos: bool
    """True where the model needs BOS at the start of every sequence (Gemma family)."""
    dtype: torch.dtype
    """Parameter dtype."""
    device: torch.device
    """Device the model lives on."""


def _local_revision(folder: Path) -> str:
    """'local:<sha256[:16]>' over config.json and the weight files' names, sizes and headers."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".safetensors":
            with path.open("rb") as fh:  # the header lists every tensor, dtype and offset
                size = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(size, 1 << 24)))
            # cheap content fingerprint: the first and last MiB of the weights
            with path.open("rb") as fh:
                digest.update(fh.read(1 << 20))
                fh.seek(max(0, path.stat().st_size - (1 << 20)))
                digest.update(fh.read())
    return "local:" + digest.hexdigest()[:16]


def _hub_revision(model: torch.nn.Module, spec: str, requested: str | None = None) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    return f"hub:{spec}" + (f"@{requested}" if requested else "")


def _needs_bos(architecture: str) -> bool:
    return architecture.startswith("gemma")


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "auto",
    weights: bool = True,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``spec`` (Hub id, local directory, or ``bundled:<name>``) in eval mode on ``device``.

    ``weights=False`` reads the config and tokenizer only (``model`` is then a
    :class:`ConfigOnly` holding the config; device "meta"): enough to plan a harvest and
    check it against an existing store before loading any weights.
    ``revision`` (Hub models only) is the commit sha, tag or branch to load; the loaded
    model's ``revision`` is the commit it resolved to.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device) if weights else torch.device("meta")
    if spec.startswith(BUNDLED_PREFIX):
        folder, bundled_revision = resolve_bundled(spec)
        source, local = str(folder), True
    else:
        path = Path(spec).expanduser()
        local = path.exists()
        if not local and (spec.startswith((".", "/", "~")) or os.sep + os.sep in spec):
            raise ModelError(f"model path {spec!r} does not exist: {OFFLINE_HINT}")
        if local and not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {spec!r} has no config.json: expected a transformers "
                f"save_pretrained folder ({OFFLINE_HINT})"
            )
        source, resolved = str(path), ""
    if revision is not None and (spec.startswith(BUNDLED_PREFIX) or local):
        raise ModelError(
            f"--revision {revision!r} applies to Hugging Face Hub models, not to "
            f"{spec!r} (a bundled model or local folder has one version): drop --revision"
        )
    if spec.startswith(BUNDLED_PREFIX):
        resolved = bundled_revision
    unreachable = None
    if not spec.startswith(BUNDLED_PREFIX) and not local:
        from masksae.hub_access import probe_hub

        unreachable = probe_hub(spec, "model")  # offline: no retries, cache only
    model, tokenizer = _from_pretrained(
        spec, source, torch_dtype, weights=weights, unreachable=unreachable, revision=revision
    )
    if not resolved:
        resolved = _local_revision(Path(source)) if local else _hub_revision(model, spec, revision)
    if weights:
        model.to(torch_device)
        model.eval()
        model.requires_grad_(False)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    architecture = str(getattr(text_config, "model_type", None) or config.model_type)
    d_model = int(
        getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None) or 0
    )
    max_context = getattr(text_config, "max_position_embeddings", None) or getattr(
        text_config, "n_positions", None
    )
    lm = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=spec,
        revision=resolved,
        architecture=architecture,
        n_layers=len(get_blocks(model)) if weights else _config_layers(text_config, spec),
        d_model=d_model,
        max_context=int(max_context) if max_context else None,
        prepend_bos=_needs_bos(architecture),
        dtype=torch_dtype,
        device=torch_device,
    )
    log.info(
        "loaded %s (%s, %d blocks, d_model %d, %s on %s, revision %s)",
        spec,
        architecture,
        lm.n_layers,
        d_model,
        torch_dtype,
        torch_device,
        resolved[:24],
    )
    return lm


class ConfigOnly:
    """Stands in for the model when only its config was read (``load_model(weights=False)``)."""

    def __init__(self, config: Any) -> None:
        self.config = config


def _config_layers(text_config: Any, spec: str) -> int:
    """Number of blocks from the config (what :func:`get_blocks` finds on the real model)."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(
        f"model {spec!r}: its config names no layer count (num_hidden_layers / n_layer): "
        "is it a causal LM?"
    )


def _from_pretrained(
    spec: str,
    source: str,
    dtype: torch.dtype,
    weights: bool = True,
    unreachable: str | None = None,
    revision: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # revision only when given: transformers' default otherwise
    at = {"revision": revision} if revision is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **at)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **at)
        else:
            # config only: building even a meta model imports its modeling code (~1 s)
            model = ConfigOnly(AutoConfig.from_pretrained(source, **at))
    except (OSError, ValueError) as exc:
        if unreachable is not None:
            raise ModelError(
                f"cannot load model {spec!r}: the Hugging Face Hub is unreachable "
                f"({unreachable}) and the model is not in the local cache ({OFFLINE_HINT})"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {spec!r}: {first[:300]} ({OFFLINE_HINT})") from exc
    except Exception as exc:  # network errors from huggingface_hub, requests, httpx ...
        name = type(exc).__name__
        if "Connect" in name or "Timeout" in name or "HTTP" in name or "Hub" in name:
            raise ModelError(
                f"cannot reach the Hub for model {spec!r}: {name} ({OFFLINE_HINT})"
            ) from exc
        raise
    return model, tokenizer


def tokenizer_id(lm: LoadedModel) -> str:
    """A portable name of the model's tokenizer: its Hub id when it was loaded from the Hub,
    else the model spec the user gave (never a machine-local cache path)."""
    name = str(getattr(lm.tokenizer, "name_or_path", "") or "")
    is_path = not name or name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    return lm.model_id if is_path or lm.model_id.startswith(BUNDLED_PREFIX) else name


def model_summary(lm: LoadedModel) -> dict[str, Any]:
    """JSON-able description of a loaded model (for provenance)."""
    return json.loads(
        json.dumps(
            {
                "model": lm.model_id,
                "revision": lm.revision,
                "architecture": lm.architecture,
                "n_layers": lm.n_layers,
                "d_model": lm.d_model,
                "max_context": lm.max_context,
                "prepend_bos": lm.prepend_bos,
                "tokenizer": tokenizer_id(lm),
                "tokenizer_class": type(lm.tokenizer).__name__,
            }
        )
    )
