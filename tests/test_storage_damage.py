"""Damaged shards of chunks recorded complete: truncated files are refused at open (their size
differs from the record) and rewritten by a rerun harvest; garbage that keeps the size gives a
StoreError naming the chunk, the file and the fix wherever the data is read, and never a raw
zarr/codec traceback; `train` without --verify stops with that error (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from masksae.errors import StoreError
from masksae.storage import ActivationStore, StoreWriter
from masksae.storage import layout as store_layout
from masksae.storage.reader import UnreadableChunkError
from masksae.storage.schema import ARRAY_NAMES
from test_storage import CHUNK, make_data, make_spec, write_store


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("damage") / "s"
    write_store(path, make_spec(compression="zstd:1"), data)
    return path


def damaged_copy(pristine, tmp_path, name: str, how: str):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(pristine, path)
    shard = store_layout.chunk_files(path, 1)[ARRAY_NAMES.index(name)]
    raw = shard.read_bytes()
    if how == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    else:  # same size, other bytes
        shard.write_bytes(np.random.default_rng(0).integers(0, 256, len(raw), np.uint8).tobytes())
    return path, shard


def test_records_hold_the_shard_sizes(pristine):
    record = json.loads(store_layout.manifest_path(pristine, 1).read_text())
    files = store_layout.chunk_files(pristine, 1)
    assert record["file_sizes"] == {
        f.relative_to(pristine).as_posix(): f.stat().st_size for f in files
    }


@pytest.mark.parametrize("name", ARRAY_NAMES)
def test_truncated_shard_is_refused_at_open(pristine, tmp_path, data, name):
    path, shard = damaged_copy(pristine, tmp_path, name, "truncate")
    rel = shard.relative_to(path).as_posix()
    with pytest.raises(StoreError, match=rf"chunk 1: shard file\(s\) truncated .*{rel} \(\d+ "):
        ActivationStore.open(path)
    store = ActivationStore.open(path, require_complete=False)
    assert store.missing_chunks == [1]
    (problem,) = store.verify()
    assert problem.startswith("chunk 1 ") and "rerun the harvest" in problem


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_rerun_harvest_rewrites_a_damaged_chunk(pristine, tmp_path, data, how):
    from test_storage import slice_data

    path, _ = damaged_copy(pristine, tmp_path, "activations", how)
    if how == "garbage":  # the fix the error names: delete the record, rerun the harvest
        store_layout.manifest_path(path, 1).unlink()
    writer = StoreWriter.open(path, make_spec(compression="zstd:1"))
    assert writer.completed_chunks == {0, 2, 3}
    with writer:
        start, stop = writer.chunk_bounds(1)
        writer.write_chunk(1, slice_data(data, start, stop))
    store = ActivationStore.open(path)
    assert store.verify() == []
    np.testing.assert_array_equal(
        store.read(CHUNK, 2 * CHUNK).activations, data.activations[CHUNK : 2 * CHUNK]
    )


@pytest.mark.parametrize("name", ARRAY_NAMES)
def test_garbage_shard_gives_a_clear_error_where_it_is_read(pristine, tmp_path, name):
    path, shard = damaged_copy(pristine, tmp_path, name, "garbage")
    store = ActivationStore.open(path)  # same size: found when read
    expected = (
        rf"chunk 1 of store .* is unreadable: its {name} shard {shard} cannot be decoded "
        rf"\(.*\); delete its completion record .*000001.json and rerun the harvest"
    )
    with pytest.raises(UnreadableChunkError, match=expected) as info:
        store.read_chunk(1, (name,))
    assert info.value.index == 1 and info.value.array == name
    with pytest.raises(UnreadableChunkError, match=expected):
        store.read(CHUNK - 10, CHUNK + 10)  # a range across chunks 0 and 1
    store.read(0, CHUNK)  # chunk 0 is fine
    # the stream reads activations, excluded, and masked when it filters masked tokens
    if name in ("activations", "excluded", "masked"):
        with pytest.raises(UnreadableChunkError, match=expected):
            for _ in store.stream(32, include_masked=False):
                pass
    (problem,) = store.verify()
    assert problem.startswith("chunk 1 ") and f"unreadable {name} shard" in problem


@pytest.mark.parametrize("name", ["activations", "excluded"])
def test_train_without_verify_stops_on_an_unreadable_shard(pristine, tmp_path, name):
    from masksae.cli import app

    path, _ = damaged_copy(pristine, tmp_path, name, "garbage")
    args = [
        "train", "--store", str(path), "--out", str(tmp_path / "run"), "--architecture",
        "topk", "--k", "2", "--d-sae", "32", "--tokens", "1600", "--batch-size", "100",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "chunk 1 of store" in res.output and "rerun the harvest" in res.output
    assert "Traceback" not in res.output


_LOSER_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_storage as t
from masksae.storage import StoreWriter, layout

real = layout.create_store
def create_after_the_winner(path, spec):
    Path({waiting!r}).touch()  # past the "does it exist?" check, about to create
    while not Path({ready!r}).exists():
        time.sleep(0.02)
    real(path, spec)
layout.create_store = create_after_the_winner
StoreWriter.open({path!r}, t.make_spec())
"""


def test_loser_of_two_simultaneous_creations_is_told_who_writes(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    path, waiting, ready = tmp_path / "s", tmp_path / "waiting", tmp_path / "ready"
    script = _LOSER_SCRIPT.format(
        tests=str(Path(__file__).parent), path=str(path), waiting=str(waiting), ready=str(ready)
    )
    loser = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not waiting.exists():
            assert loser.poll() is None and time.monotonic() < deadline, loser.stderr.read()
            time.sleep(0.02)
        winner = StoreWriter.open(path, make_spec())  # created first, holds the lock
        ready.touch()
        _, stderr = loser.communicate(timeout=120)
    finally:
        if loser.poll() is None:
            loser.kill()
    winner.close()
    assert loser.returncode != 0
    assert f"is being written by pid {os.getpid()}".encode() in stderr
    assert b"permissions" not in stderr


# ---------------------------------------------------------------------------- edited metadata
def copy_store(pristine, tmp_path):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(pristine, path)
    return path


@pytest.mark.parametrize(
    "content, reason",
    [
        ("[]", "is a JSON list, not an object"),
        ('"done"', "is a JSON str, not an object"),
        ("{", "is unreadable (JSONDecodeError)"),
        ('{"index": 1}', "field start is None, expected a int"),
    ],
)
def test_damaged_chunk_record_is_named_not_a_traceback(pristine, tmp_path, content, reason):
    from masksae.cli import app

    path = copy_store(pristine, tmp_path)
    store_layout.manifest_path(path, 1).write_text(content)
    with pytest.raises(
        StoreError, match=rf"chunk 1: completion record _chunks/000001.json {re_escape(reason)}"
    ):
        ActivationStore.open(path)
    runner = CliRunner()
    verify = runner.invoke(app, ["store", "verify", str(path), "--no-progress"])
    assert verify.exit_code == 1 and "Traceback" not in verify.output
    assert f"BAD chunk 1 (tokens {CHUNK}..{2 * CHUNK}): completion record" in verify.output
    info = runner.invoke(app, ["store", "info", str(path)])
    assert info.exit_code == 0 and "INCOMPLETE" in info.output
    train = runner.invoke(
        app,
        ["train", "--store", str(path), "--out", str(tmp_path / "o"), "--architecture", "topk",
         "--k", "2", "--d-sae", "32", "--steps", "2", "--batch-size", "64", "--device", "cpu",
         "--no-progress"],
    )  # fmt: skip
    assert train.exit_code == 2 and "completion record _chunks/000001.json" in train.output
    # a rerun harvest rewrites the chunk (the record is replaced)
    assert StoreWriter.open(path, make_spec(compression="zstd:1")).completed_chunks == {0, 2, 3}


@pytest.mark.parametrize(
    "array, edit, what",
    [
        ("activations", lambda m: m["shape"].__setitem__(1, 23), "shape [1000, 23]"),
        ("activations", lambda m: m.__setitem__("data_type", "float16"), "data_type 'float16'"),
        ("excluded", lambda m: m["shape"].__setitem__(0, 1200), "shape [1200]"),
        (
            "token_ids",
            lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [128]),
            "chunk shape [128]",
        ),
    ],
)
def test_edited_array_metadata_is_reported_as_such(pristine, tmp_path, array, edit, what):
    from masksae.cli import app

    path = copy_store(pristine, tmp_path)
    meta_file = path / array / "zarr.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"{array}/zarr.json: {re_escape(what)} differs from"):
        ActivationStore.open(path)
    res = CliRunner().invoke(app, ["store", "verify", str(path), "--no-progress"])
    assert res.exit_code == 1 and "the array metadata was edited or replaced" in res.output
    assert "checksum mismatch" not in res.output
    store = ActivationStore.open(path, require_complete=False)
    with pytest.raises(StoreError, match="cannot be read"):
        store.read(0, 10)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_edited_statistics_are_found_by_verify(pristine, tmp_path):
    path = copy_store(pristine, tmp_path)
    group = json.loads((path / "zarr.json").read_text())
    group["attributes"]["statistics"]["mean_sq_norm"] *= 4  # what training would scale with
    (path / "zarr.json").write_text(json.dumps(group))
    (problem,) = ActivationStore.open(path).verify()
    assert "statistics.mean_sq_norm differs from the value the chunk records give" in problem


def test_edited_chunk_record_statistics_are_found_by_verify(pristine, tmp_path):
    path = copy_store(pristine, tmp_path)
    record_file = store_layout.manifest_path(path, 2)
    record = json.loads(record_file.read_text())
    record["stats"]["sum_sq_norm"] *= 0.5  # the trainer's normalisation scale comes from these
    record_file.write_text(json.dumps(record))
    problems = ActivationStore.open(path).verify()
    assert any(p.startswith("chunk 2 ") and "stats.sum_sq_norm differ" in p for p in problems)
    assert any("statistics" in p and "zarr.json" in p for p in problems)  # group attrs too
