"""`masksae train` and `masksae export` through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from test_train_fixtures import make_store

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_sweep_resume_and_export_cli(tmp_path):
    from masksae.cli import app

    make_store(tmp_path / "store", n_tokens=2048, chunk_tokens=512)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        "[train]\nsteps = 12\nbatch_size = 128\nwarmup_steps = 2\nlog_every = 4\n"
        'checkpoint_every = 4\ndevice = "cpu"\n'
        '[sae]\narchitecture = "batch_topk"\nd_sae = 32\nthreshold_start_step = 2\n'
        "[grid]\nk = [2, 4]\n"
    )
    runner = CliRunner()
    args = [
        "train",
        "--store",
        str(tmp_path / "store"),
        "--config",
        str(sweep),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "batch_topk-k2-F32-s0" in result.output and "data wait" in result.output
    run_dir = tmp_path / "out" / "batch_topk-k4-F32-s0"
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["step"] == 12 and meta["sae"]["k"] == 4
    # the same command again is refused (exit 2, nothing touched); --resume is a no-op
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0
    # a changed setting on resume is refused and named
    changed = runner.invoke(app, [*args, "--resume", "--batch-size", "64"])
    assert changed.exit_code == 2 and "batch_size: 128 -> 64" in changed.output
    # an SAE flag overrides --config (here on resume: a changed run, refused and named)
    mixed = runner.invoke(app, [*args, "--resume", "--k", "3"])
    assert mixed.exit_code == 2 and "batch_topk-k3-F32-s0" in mixed.output

    exported = runner.invoke(
        app, ["export", str(run_dir), "--format", "saelens", "--out", str(tmp_path / "sl")]
    )
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "jumprelu"


def test_single_sae_flags_cli(tmp_path):
    from masksae.cli import app

    make_store(tmp_path / "store", n_tokens=1024, chunk_tokens=512)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "out"),
            "--architecture",
            "topk",
            "--k",
            "2",
            "--d-sae",
            "32",
            "--steps",
            "6",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--no-normalize",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "topk-k2-F32-s0" / "config.json").read_text())
    assert meta["normalization_scale"] is None and meta["train"]["steps"] == 6
    bad = CliRunner().invoke(
        app,
        [
            "train",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "o2"),
            "--architecture",
            "topk",
            "--k",
            "64",
            "--d-sae",
            "32",
            "--steps",
            "2",
        ],
    )
    assert bad.exit_code == 2 and "k=64" in bad.output
    missing = CliRunner().invoke(
        app, ["train", "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
