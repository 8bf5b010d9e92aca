"""Multi-rank harvest pieces: attaching under rank 0's lock, --devices parsing.

The end-to-end 2-rank harvests (torchrun and --devices) are in test_distributed.py.
"""

from __future__ import annotations

import json

import pytest

from masksae.errors import ConfigError, ProvenanceMismatchError, StoreError
from masksae.harvest.parallel import parse_devices
from masksae.storage import StoreWriter


def test_rank_attach_requires_rank0_lock_and_same_spec(tmp_path):
    from masksae.storage import StoreSpec

    spec = StoreSpec(
        d_model=4, dtype="float32", chunk_tokens=8, total_tokens=32, provenance={"p": 0.3}
    )
    path = tmp_path / "s"
    with StoreWriter.open(path, spec) as rank0:
        owner = rank0.lock_owner
        assert owner and owner.split(":")[1] == str(__import__("os").getpid())
        other = StoreWriter.attach(path, spec, owner=owner)
        other.close()  # writes nothing, finalises nothing
        assert json.loads((path / "zarr.json").read_text())["attributes"]["complete"] is False
        with pytest.raises(StoreError, match=r"held by .*, not by rank 0's writer someone-else"):
            StoreWriter.attach(path, spec, owner="someone-else")
        changed = StoreSpec(
            d_model=4, dtype="float32", chunk_tokens=8, total_tokens=32, provenance={"p": 0.2}
        )
        with pytest.raises(ProvenanceMismatchError, match="provenance.p"):
            StoreWriter.attach(path, changed, owner=owner)
        assert rank0.n_chunks == 4
    with pytest.raises(StoreError, match="held by nobody"):
        StoreWriter.attach(path, spec, owner=owner)


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
