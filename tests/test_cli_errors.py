"""Bad CLI input gives one line naming the problem and the fix, exit status 2, no traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from test_train_fixtures import make_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args: list[str]):
    from masksae.cli import app

    return CliRunner().invoke(app, args)


def _assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is not None
    assert not isinstance(result.exception, OSError)
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    return path


def test_output_paths_that_are_files_are_refused(tmp_path, a_file):
    make_store(tmp_path / "store", n_tokens=1024, chunk_tokens=512)
    train = ["train", "--store", str(tmp_path / "store"), "--steps", "2", "--no-progress"]
    _assert_user_error(_invoke([*train, "--out", str(a_file)]), "--out", "is a file")
    _assert_user_error(
        _invoke([*train, "--out", str(a_file / "sub")]), "lies under the file", str(a_file)
    )
    ckpts = ["--checkpoints", str(tmp_path)]
    _assert_user_error(_invoke(["evaluate", *ckpts, "--out", str(a_file)]), "--out")
    _assert_user_error(
        _invoke(["evaluate", *ckpts, "--out", str(tmp_path / "e"), "--cache", str(a_file)]),
        "--cache",
    )
    _assert_user_error(_invoke(["report", str(tmp_path), "--out", str(a_file)]), "--out")
    _assert_user_error(
        _invoke(["export", str(tmp_path), "--format", "saelens", "--out", str(a_file)]),
        "--out",
    )
    assert a_file.read_text() == "x"


def test_os_path_errors_become_one_line(monkeypatch):
    from masksae.cli_utils import user_errors

    @user_errors
    def boom() -> None:
        raise NotADirectoryError(20, "Not a directory", "/x/y")

    import typer

    with pytest.raises(typer.Exit) as info:
        boom()
    assert info.value.exit_code == 2

    @user_errors
    def other() -> None:
        raise ConnectionResetError(104, "reset")

    with pytest.raises(ConnectionResetError):  # not a path problem: left alone
        other()


def test_train_flag_conflicts(tmp_path):
    make_store(tmp_path / "store", n_tokens=1024, chunk_tokens=512)
    base = ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "o")]
    both = _invoke([*base, "--steps", "2", "--tokens", "512", "--no-progress"])
    _assert_user_error(both, "--steps 2", "--tokens 512", "give one of them")
    relu_k = _invoke([*base, "--architecture", "relu", "--k", "5", "--no-progress"])
    _assert_user_error(relu_k, "--k 5", "relu", "drop --k")
    assert not (tmp_path / "o").exists()


def test_tokens_flag_replaces_config_steps(tmp_path):
    make_store(tmp_path / "store", n_tokens=2048, chunk_tokens=512)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        '[train]\nsteps = 12\nbatch_size = 128\nwarmup_steps = 2\ndevice = "cpu"\n'
        '[sae]\narchitecture = "topk"\nd_sae = 32\nk = 4\n'
    )
    out = tmp_path / "out"
    args = ["train", "--store", str(tmp_path / "store"), "--config", str(sweep)]
    result = _invoke([*args, "--out", str(out), "--tokens", "512", "--no-progress"])
    assert result.exit_code == 0, result.output
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["step"] == 4  # 512 / 128


def test_evaluate_and_report_messages_name_the_fix(tmp_path):
    make_store(tmp_path / "store", n_tokens=1024, chunk_tokens=512)
    store = _invoke(["evaluate", "--checkpoints", str(tmp_path / "store"), "--out", "e"])
    _assert_user_error(store, "activation store", "--out folder of `masksae train`")
    empty_metrics = _invoke(
        ["evaluate", "--checkpoints", str(tmp_path), "--out", "e", "--metrics", ","]
    )
    _assert_user_error(empty_metrics, "--metrics names no metric", "core")
    (tmp_path / "empty").mkdir()
    report = _invoke(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    _assert_user_error(report, "no result JSON files", "masksae evaluate")
    assert not (tmp_path / "r").exists()
    export = _invoke(["export", str(tmp_path / "nope"), "--format", "saelens", "--out", "x"])
    _assert_user_error(export, "not a directory", "masksae train")


def test_bad_single_sae_flags_name_the_flag(tmp_path):
    base = ["train", "--store", str(tmp_path / "no-store"), "--out", str(tmp_path / "o")]
    zero = _invoke([*base, "--d-sae", "0", "--no-progress"])  # was silently 4096
    _assert_user_error(zero, "--sae.d-sae 0 is invalid: expected a positive integer")
    _assert_user_error(_invoke([*base, "--k", "-3"]), "--sae.k -3 is invalid")
    # the unknown architecture is the problem, not the --k that depends on it
    unknown = _invoke([*base, "--architecture", "foo", "--k", "20"])
    _assert_user_error(unknown, "architecture 'foo' is unknown: expected one of")
    assert "--k" not in unknown.output
    assert not (tmp_path / "o").exists()


def test_harvest_validates_the_seed_before_creating_the_store(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    args = [
        "harvest", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--tokens", "64",
        "--context-length", "32", "--device", "cpu", "--no-progress", "--out",
        str(tmp_path / "s"),
    ]  # fmt: skip
    _assert_user_error(_invoke([*args, "--seed", "-1"]), "--seed -1 is invalid")
    assert not (tmp_path / "s").exists()  # the corrected rerun is not refused
    assert _invoke([*args, "--seed", "1"]).exit_code == 0
