"""The peers' own training steps (dictionary_learning's MatryoshkaBatchTopK trainer, sparsify's
TopK SparseCoder), for side-by-side timing in one process with ours.

The peer packages live in a separate virtual environment (``benchmarks/setup_peers.sh``
installs pinned versions there with ``--no-deps``, so they use this process's torch); its
site-packages is appended to ``sys.path``, after ours. Their package ``__init__`` files
import things a training step does not need (nnsight, datasets, schedulefree), so the
packages are registered as bare namespaces and only the step's modules are imported.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import types
from pathlib import Path

import torch

DEFAULT_VENV = "/tmp/masksae-peers"
VERSIONS = {"dictionary_learning": "dictionary-learning==0.1.0", "sparsify": "eai-sparsify==1.3.3"}


def peer_site() -> Path | None:
    """site-packages of the peers' venv (``MASKSAE_PEER_SITE``, else under /tmp)."""
    explicit = os.environ.get("MASKSAE_PEER_SITE")
    if explicit:
        return Path(explicit)
    venv = os.environ.get("MASKSAE_PEER_VENV", DEFAULT_VENV)
    found = sorted(glob.glob(f"{venv}/lib/python3*/site-packages"))
    return Path(found[-1]) if found else None


def _bare_package(name: str, site: Path) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(site / name)]  # submodules import; __init__ never runs
        sys.modules[name] = module


def load() -> dict[str, types.ModuleType] | None:
    """The peers' step modules, or None when their venv is missing."""
    site = peer_site()
    if site is None or not (site / "dictionary_learning").is_dir():
        return None
    if str(site) not in sys.path:
        sys.path.append(str(site))
    for name in VERSIONS:
        _bare_package(name, site)
    if not torch.cuda.is_available():  # sparsify's Triton decoder needs a GPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    return {
        "dl_matryoshka": importlib.import_module(
            "dictionary_learning.trainers.matryoshka_batch_top_k"
        ),
        "sparsify_coder": importlib.import_module("sparsify.sparse_coder"),
        "sparsify_config": importlib.import_module("sparsify.config"),
    }


class DictionaryLearningMatryoshka:
    """dictionary_learning's MatryoshkaBatchTopKTrainer.update: its full step."""

    def __init__(self, mods, d: int, f: int, k: int, steps: int) -> None:
        torch.manual_seed(0)
        self.trainer = mods["dl_matryoshka"].MatryoshkaBatchTopKTrainer(
            steps=steps,
            activation_dim=d,
            dict_size=f,
            k=k,
            layer=15,
            lm_name="bench",
            group_fractions=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32],
            warmup_steps=1,
            device="cpu",
        )

    def step(self, x: torch.Tensor, i: int) -> float:
        return float(self.trainer.update(i, x))


class SparsifyTopK:
    """sparsify's SparseCoder step as its trainer runs it (fvu loss, Adam, no AuxK): renorm
    decoder, forward, backward, remove the decoder-parallel gradient, Adam."""

    def __init__(self, mods, d: int, f: int, k: int) -> None:
        torch.manual_seed(0)
        cfg = mods["sparsify_config"].SparseCoderConfig(num_latents=f, k=k)
        self.sae = mods["sparsify_coder"].SparseCoder(d, cfg, device="cpu")
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=2e-4 / (f / 2**14) ** 0.5)

    def step(self, x: torch.Tensor, i: int) -> float:
        sae = self.sae
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        loss = out.fvu + out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        return float(loss)


class Ours:
    """masksae's step as the trainer runs it (fused path, fused Adam, TrainConfig's default
    selection precision for this machine)."""

    def __init__(self, arch: str, d: int, f: int, k: int) -> None:
        from masksae.train.config import resolve_select_dtype
        from masksae.train.optim import make_adam
        from masksae.train.sae import build_sae, sae_config_from_dict

        torch.manual_seed(0)
        self.sae = build_sae(
            sae_config_from_dict({"architecture": arch, "d_in": d, "d_sae": f, "k": k})
        )
        self.opt = make_adam(self.sae.parameters(), 4e-4, (0.9, 0.999), torch.device("cpu"))
        self.select_dtype = resolve_select_dtype("auto", torch.device("cpu"))

    def step(self, x: torch.Tensor, i: int) -> float:
        from masksae.train.optim import clip_grad_norm
        from masksae.train.sae import StepContext

        sae = self.sae
        if i == 0:
            sae.init_from_data(x)
        # as the trainer steps between logging steps: no metrics, its own gradient clip
        ctx = StepContext(i, 1000, None, True, self.select_dtype, want_metrics=False)
        out = sae.training_loss(x, ctx)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        known_norms = sae.remove_parallel_decoder_grad()
        clip_grad_norm(sae.parameters(), 1.0, known_norms, self.opt)
        self.opt.step()
        sae.normalize_decoder()
        return float(out.loss.detach())
