"""Multi-device harvest: 2 CPU worker processes write the same store as a single process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from masksae.errors import ConfigError, ProvenanceMismatchError, StoreError
from masksae.harvest import HarvestConfig, run_harvest
from masksae.harvest.parallel import parse_devices
from masksae.storage import ActivationStore, StoreWriter
from masksae.storage.schema import ARRAY_NAMES


def _cfg(out, model_dir, corpus, **kw) -> HarvestConfig:
    base = dict(
        out=str(out),
        model=str(model_dir),
        layer=1,
        corpus=str(corpus),
        tokens=1536,
        mask_prob=0.3,
        context_length=32,
        batch_size=4,
        chunk_sequences=8,
        device="cpu",
        seed=7,
        outlier_norm_factor=1.2,
    )  # low factor: some outliers
    base.update(kw)
    return HarvestConfig(**base)


def _assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.is_complete and b.is_complete and a.verify() == [] and b.verify() == []
    assert a.provenance == b.provenance and a.spec == b.spec
    x, y = a.read(0, a.n_tokens), b.read(0, b.n_tokens)
    for name in ARRAY_NAMES:
        u, v = np.asarray(getattr(x, name)), np.asarray(getattr(y, name))
        assert u.dtype == v.dtype and np.array_equal(u, v), name  # bit-exact
    assert a.records == b.records  # checksums, counts, partial statistics, outlier counts
    assert a.attrs["statistics"] == b.attrs["statistics"]
    assert a.fingerprint == b.fingerprint


def test_two_cpu_workers_equal_single_process(tmp_path, tiny_model_dir, tiny_corpus_jsonl):
    single = run_harvest(
        _cfg(tmp_path / "single", tiny_model_dir, tiny_corpus_jsonl), progress=False
    )
    multi_cfg = _cfg(tmp_path / "multi", tiny_model_dir, tiny_corpus_jsonl, devices=("cpu", "cpu"))
    multi = run_harvest(multi_cfg, progress=False)
    assert multi.n_chunks == single.n_chunks == 6 and multi.new_tokens == 1536
    assert multi.norm_outliers == single.norm_outliers > 0
    assert multi.masked_fraction == pytest.approx(single.masked_fraction)
    _assert_same_store(
        ActivationStore.open(tmp_path / "multi"), ActivationStore.open(tmp_path / "single")
    )
    # resume: drop two chunks (one per worker) and rerun: only those are recomputed
    for index in (1, 4):
        (tmp_path / "multi" / "_chunks" / f"{index:06d}.json").unlink()
    again = run_harvest(multi_cfg, progress=False)
    assert again.skipped_chunks == 4 and again.new_tokens == 2 * 8 * 32
    _assert_same_store(
        ActivationStore.open(tmp_path / "multi"), ActivationStore.open(tmp_path / "single")
    )


def test_worker_attach_requires_parent_lock_and_same_spec(tmp_path):
    from masksae.storage import StoreSpec

    spec = StoreSpec(
        d_model=4, dtype="float32", chunk_tokens=8, total_tokens=32, provenance={"p": 0.3}
    )
    path = tmp_path / "s"
    with StoreWriter.open(path, spec) as parent:
        import os

        worker = StoreWriter.attach(path, spec, owner_pid=os.getpid())
        worker.close()  # writes nothing, finalises nothing
        assert json.loads((path / "zarr.json").read_text())["attributes"]["complete"] is False
        with pytest.raises(StoreError, match=r"held by pid \d+, not by the parent pid 1\b"):
            StoreWriter.attach(path, spec, owner_pid=1)
        other = StoreSpec(
            d_model=4, dtype="float32", chunk_tokens=8, total_tokens=32, provenance={"p": 0.2}
        )
        with pytest.raises(ProvenanceMismatchError, match="provenance.p"):
            StoreWriter.attach(path, other, owner_pid=os.getpid())
        assert parent.n_chunks == 4
    with pytest.raises(StoreError, match="held by nobody"):
        StoreWriter.attach(path, spec, owner_pid=os.getpid())


def test_parse_devices():
    assert parse_devices("cpu, cpu") == ("cpu", "cpu")
    assert parse_devices(["cpu"]) == ("cpu",)
    with pytest.raises(ConfigError, match="names no device"):
        parse_devices(" , ")
    with pytest.raises(ConfigError, match="not 'auto'"):
        parse_devices("auto,auto")
    with pytest.raises(ConfigError, match="unknown device 'gpu7'"):
        parse_devices("cpu,gpu7")


def test_devices_cli_help_and_bad_value(tmp_path):
    from typer.testing import CliRunner

    from masksae.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["harvest", "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "--devices" in res.output and "--outlier-norm-factor" in res.output
    res = runner.invoke(
        app, ["harvest", "--devices", "cpu,nonsense-device", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "unknown device 'nonsense-device'" in res.output
