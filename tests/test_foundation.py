"""Tests of the shared foundation: config parsing, atomic writes, devices, the CLI shell."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from masksae.atomic import atomic_write_json
from masksae.cli import app
from masksae.config import from_dict, to_dict
from masksae.devices import resolve_device, resolve_dtype
from masksae.errors import ConfigError


@dataclasses.dataclass
class _Cfg:
    k: int = 20
    lr: float = 1e-3
    fractions: tuple[float, ...] = (0.5, 0.5)
    name: str | None = None


def test_from_dict_coerces_and_rejects_unknown_keys() -> None:
    cfg = from_dict(_Cfg, {"k": 40, "lr": 1, "fractions": [0.25, 0.75]})
    assert cfg == _Cfg(k=40, lr=1.0, fractions=(0.25, 0.75))
    assert isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['kk'\].*valid keys"):
        from_dict(_Cfg, {"kk": 1})
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(_Cfg, {"k": "twenty"})
    assert to_dict(cfg)["fractions"] == [0.25, 0.75]


def test_atomic_write_json_replaces_whole_file(tmp_path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temp files left


def test_atomic_write_leaves_old_file_on_failure(tmp_path) -> None:
    from masksae.atomic import atomic_write

    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(path) -> None:
        path.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_dtype_and_device_resolution() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cli_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("masksae ")
