"""Every file the project writes follows the umask (a teammate can read a copied store,
run, export or report): atomic writes used to leave 0600 files from ``mkstemp``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from masksae.train.config import RunSpec, TrainConfig
from masksae.train.export import export
from masksae.train.trainer import Trainer
from test_report import _doc
from test_train_fixtures import make_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def file_modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_store_run_export_and_report_follow_the_umask(tmp_path, umask_027):
    from masksae.evaluate.report import write_report

    expected = 0o666 & ~umask_027  # 0640
    store = make_store(tmp_path / "store", n_tokens=1024, chunk_tokens=512)
    spec = {"architecture": "topk", "d_sae": 32, "k": 3}
    cfg = TrainConfig(steps=4, batch_size=128, warmup_steps=1, device="cpu", log_every=2)
    Trainer(store, [RunSpec("topk", spec, None, 0)], cfg, tmp_path / "run", progress=False).train()
    run_dir = next(p.parent for p in (tmp_path / "run").rglob("sae.safetensors"))
    export(run_dir, "saelens", tmp_path / "export")
    results = tmp_path / "eval"
    results.mkdir()
    (results / "r.json").write_text(json.dumps(_doc(20, 0.0, 0, 0.7, 0.1)))
    write_report([results], tmp_path / "report")
    for folder in ("store", "run", "export", "report"):
        modes = file_modes(tmp_path / folder)
        assert modes, folder
        wrong = {name: oct(mode) for name, mode in modes.items() if mode != expected}
        assert not wrong, f"{folder}: {wrong}"
    assert "zarr.json" in file_modes(tmp_path / "store")
    assert any(name.startswith("_chunks/") for name in file_modes(tmp_path / "store"))
