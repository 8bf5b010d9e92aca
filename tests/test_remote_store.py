"""Stores on object storage, against a real S3-compatible server on loopback (moto).

Covers the same guarantees as local stores: records after data, resume after a killed
writer, provenance refusal, verify (reading the store itself), the lease writer lock,
the chunk cache (deterministic stream, bounded size), store copy and ls, and the commands
(harvest to s3://, kill, resume, verify, train, copy back, corrupt an object).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from masksae.errors import ConfigError, ProvenanceMismatchError, StoreError
from masksae.storage import ActivationStore, StoreWriter
from masksae.storage.location import StoreLocation, parse_storage_options
from test_storage import CHUNK, N_TOKENS, make_data, make_spec, slice_data, write_store

pytestmark = pytest.mark.usefixtures("s3_server")


def s3fs_of():
    import s3fs

    return s3fs.S3FileSystem()


@pytest.fixture(scope="module")
def data():
    return make_data()


def test_storage_options_and_urls(tmp_path):
    assert parse_storage_options(["anon=true", "endpoint_url=http://h:9", "a.b=3"]) == {
        "anon": True,
        "endpoint_url": "http://h:9",
        "a": {"b": 3},
    }
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_storage_options(["novalue"])
    local = StoreLocation.parse(f"file://{tmp_path}/s")
    assert local.is_local and local.local_path == tmp_path / "s"
    assert StoreLocation.parse(tmp_path / "s").local_path == tmp_path / "s"
    assert not StoreLocation.parse("s3://bucket/a/b").is_local
    assert StoreLocation.parse("s3://bucket/").root == "bucket"
    with pytest.raises(StoreError, match="unknownproto"):
        StoreLocation.parse("unknownproto://x/y")
    # Hub dataset repos resolve to huggingface_hub's filesystem (the Hub itself is not
    # reachable here: no request is made to parse a URL)
    hub = StoreLocation.parse("hf://datasets/org/name/stores/x")
    assert type(hub.fs).__name__ == "HfFileSystem" and hub.root == "datasets/org/name/stores/x"


def test_remote_round_trip_stream_and_cache(s3_bucket, tmp_path, data):
    url = f"{s3_bucket}/stores/bf16"
    spec = make_spec("bfloat16")
    write_store(url, spec, data)
    write_store(tmp_path / "local", spec, data)
    remote = ActivationStore.open(url, cache_dir=tmp_path / "cache")
    local = ActivationStore.open(tmp_path / "local")
    assert remote.is_remote and remote.is_complete and remote.verify() == []
    assert remote.fingerprint == local.fingerprint and remote.records == local.records
    got, want = remote.read(100, 700), local.read(100, 700)
    assert np.array_equal(got.activations, want.activations)
    # the shuffled stream is the same as the local store's, epoch after epoch
    kwargs = dict(seed=5, shuffle_buffer_tokens=128, epochs=2)
    first = list(remote.stream(32, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(first, local.stream(32, **kwargs), strict=True))
    cache = remote.chunk_cache()
    fetched = cache.fetched_bytes
    assert fetched > 0 and cache.cached_bytes() == fetched  # each chunk fetched once
    again = list(remote.stream(32, **kwargs))  # a second pass: all from the cache
    assert cache.fetched_bytes == fetched
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # a new reader with the same cache folder fetches nothing either
    reopened = ActivationStore.open(url, cache_dir=tmp_path / "cache")
    next(iter(reopened.stream(32, seed=5)))
    assert reopened.chunk_cache().fetched_bytes == 0


def test_bounded_cache_evicts_and_stays_exact(s3_bucket, tmp_path, data):
    url = f"{s3_bucket}/stores/f32"
    write_store(url, make_spec(), data)
    write_store(tmp_path / "local", make_spec(), data)
    one_chunk = CHUNK * data.activations.shape[1] * 4
    small = ActivationStore.open(
        url, cache_dir=tmp_path / "cache", cache_bytes=2 * one_chunk, read_ahead=1
    )
    kwargs = dict(seed=2, shuffle_buffer_tokens=64, epochs=2, prefetch=1)
    batches = list(small.stream(16, **kwargs))
    local = list(ActivationStore.open(tmp_path / "local").stream(16, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(batches, local, strict=True))
    cache = small.chunk_cache()
    assert cache.cached_bytes() <= 3 * one_chunk  # the limit, plus the chunk in flight
    assert cache.fetched_bytes > 4 * one_chunk  # chunks were evicted and fetched again


def test_remote_writer_resume_provenance_and_records_after_data(s3_bucket, data):
    url = f"{s3_bucket}/stores/resume"
    spec = make_spec()
    crashed = write_store(url, spec, data, chunks=[0, 2], close=False)
    crashed.writer_lock.release()  # "crash": the writer is dropped, its lease released
    fs = s3fs_of()
    root = url.removeprefix("s3://")
    # a torn chunk 1: its data objects are there, its record is not
    fs.pipe_file(f"{root}/activations/c/1/0", b"partial")
    store = ActivationStore.open(url, require_complete=False)
    assert store.completed_chunks == {0, 2} and store.missing_chunks == [1, 3]
    with pytest.raises(ProvenanceMismatchError, match="provenance.seed: store has 7, requested 8"):
        StoreWriter.open(url, make_spec(seed=8))
    writer = StoreWriter.open(url, spec)
    assert writer.completed_chunks == {0, 2}
    for index in (1, 3):
        writer.write_chunk(index, slice_data(data, *writer.chunk_bounds(index)))
    writer.close()
    done = ActivationStore.open(url)
    problems = done.verify()
    assert problems == [], problems[0][:3000]
    assert not fs.exists(f"{root}/.writer.lock")  # released on close
    # the one rule over the listing: a record without its shard objects is incomplete
    fs.rm_file(f"{root}/masked/c/3")
    broken = ActivationStore.open(url, require_complete=False)
    assert broken.missing_chunks == [3] and "masked/c/3" in broken.broken[3]
    assert "shard file(s) missing (masked/c/3)" in broken.verify()[0]


def test_lease_lock(s3_bucket, data):
    url = f"{s3_bucket}/stores/lock"
    first = StoreWriter.open(url, make_spec(), lease_s=30)
    owner = first.lock_owner
    from masksae.storage import lock

    lock._HELD_LEASES.clear()  # pretend another process holds it
    with pytest.raises(StoreError, match=r"is being written by .*--break-lock"):
        StoreWriter.open(url, make_spec())
    second = StoreWriter.open(url, make_spec(), break_lock=True, lease_s=30)
    assert second.lock_owner != owner
    # the first writer finds out at its next heartbeat and stops before writing more
    first.writer_lock._stop.set()
    first.writer_lock._heartbeat_once()
    with pytest.raises(StoreError, match="lost its writer lock"):
        first.write_chunk(0, slice_data(data, 0, CHUNK))
    second.close()
    # an expired lease (writer killed long ago) is taken over without --break-lock
    fs = s3fs_of()
    root = url.removeprefix("s3://")
    stale = {"owner": "deadhost:1:x", "expires_at": time.time() - 5}
    fs.pipe_file(f"{root}/.writer.lock", json.dumps(stale).encode())
    third = StoreWriter.open(url, make_spec())
    assert third.lock_owner != "deadhost:1:x"
    third.close()


def test_copy_and_ls(s3_bucket, tmp_path, data):
    from masksae.cli import app
    from masksae.storage.copy import copy_store

    write_store(tmp_path / "src", make_spec("bfloat16"), data)
    url = f"{s3_bucket}/team/smollm-p0.2"
    # an interrupted upload: two chunks arrived, then the copy resumes with the rest
    real = StoreWriter.write_raw_chunk
    calls = []

    def flaky(self, index, files, record, **kw):
        calls.append(index)
        if len(calls) > 2:
            raise OSError("connection reset")
        return real(self, index, files, record, **kw)

    StoreWriter.write_raw_chunk = flaky
    try:
        with pytest.raises(OSError, match="connection reset"):
            copy_store(tmp_path / "src", url, workers=1)
    finally:
        StoreWriter.write_raw_chunk = real
    partial = ActivationStore.open(url, require_complete=False)
    assert len(partial.completed_chunks) == 2
    result = copy_store(tmp_path / "src", url)
    assert result.skipped_chunks == 2 and result.copied_chunks == 2 and result.complete
    assert result.fingerprint == ActivationStore.open(tmp_path / "src").fingerprint
    # and back to a local folder with the CLI, verified on arrival
    runner = CliRunner()
    back = runner.invoke(app, ["store", "copy", url, str(tmp_path / "back"), "--no-progress"])
    assert back.exit_code == 0, back.output
    assert "copied 4 chunk(s)" in back.output and "is complete" in back.output
    assert ActivationStore.open(tmp_path / "back").verify() == []
    listed = runner.invoke(app, ["store", "ls", s3_bucket, "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["path"] == url and row["complete"] and row["tokens"] == N_TOKENS
    assert row["layer"] == 3 and row["size_bytes"] > 0
    text = runner.invoke(app, ["store", "ls", str(tmp_path)])
    assert "back" in text.output and "src" in text.output and "complete" in text.output
    info = runner.invoke(app, ["store", "info", url])
    assert info.exit_code == 0 and url in info.output and "4/4 complete" in info.output


# ---------------------------------------------------------------- the commands end to end
def _harvest_cmd(out: str, model_dir, corpus, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "masksae",
        "harvest",
        "--no-progress",
        *("--out", out, "--model", str(model_dir), "--layer", "1"),
        *("--corpus", str(corpus), "--tokens", "3072", "--mask-prob", "0.3"),
        *("--context-length", "32", "--batch-size", "4", "--chunk-sequences", "4"),
        *("--device", "cpu", "--seed", "3"),
        *extra,
    ]


def test_harvest_to_s3_kill_resume_verify_train_copy_corrupt(
    s3_bucket, tmp_path, tiny_model_dir, tiny_corpus_jsonl
):
    from masksae.cli import app
    from masksae.harvest import HarvestConfig, run_harvest
    from masksae.train.config import SweepConfig, TrainConfig
    from masksae.train.sweep import train_sweep

    url = f"{s3_bucket}/stores/tiny-L1-p0.3"
    root = url.removeprefix("s3://")
    fs = s3fs_of()
    env = {"OMP_NUM_THREADS": "1"}
    import os

    proc = subprocess.Popen(
        _harvest_cmd(url, tiny_model_dir, tiny_corpus_jsonl),
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill it after 3 chunks
        fs.invalidate_cache()
        if len(fs.glob(f"{root}/_chunks/*.json")) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    killed = ActivationStore.open(url, require_complete=False)
    assert 3 <= len(killed.completed_chunks) < killed.n_chunks == 24
    # the dead writer's lease is still live: a rerun names it and --break-lock
    again = subprocess.run(
        _harvest_cmd(url, tiny_model_dir, tiny_corpus_jsonl),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "--break-lock" in again.stderr, again.stderr[-3000:]
    resumed = subprocess.run(
        _harvest_cmd(url, tiny_model_dir, tiny_corpus_jsonl, "--break-lock"),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    # the resumed remote store equals an uninterrupted local harvest
    local = tmp_path / "local"
    run_harvest(
        HarvestConfig(
            out=str(local),
            model=str(tiny_model_dir),
            layer=1,
            corpus=str(tiny_corpus_jsonl),
            tokens=3072,
            mask_prob=0.3,
            context_length=32,
            batch_size=4,
            chunk_sequences=4,
            device="cpu",
            seed=3,
        ),
        progress=False,
    )
    runner = CliRunner()
    ok = runner.invoke(app, ["store", "verify", url, "--no-progress"])
    assert ok.exit_code == 0 and "OK: all 24 chunks" in ok.output, ok.output
    assert ActivationStore.open(url).fingerprint == ActivationStore.open(local).fingerprint
    # train from s3:// (through the chunk cache) and from the local store: same weights
    train = TrainConfig(
        steps=6, batch_size=64, warmup_steps=1, log_every=3, device="cpu", cache_dir=str(tmp_path)
    )
    sweep = SweepConfig(train=train, sae={"architecture": "topk", "d_sae": 32, "k": 4})
    remote_run = train_sweep(url, sweep, tmp_path / "sae-remote", progress=False).runs[0]
    local_run = train_sweep(local, sweep, tmp_path / "sae-local", progress=False).runs[0]
    from safetensors.torch import load_file

    wa = load_file(str(remote_run.path / "sae.safetensors"))
    wb = load_file(str(local_run.path / "sae.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # copy it back, verified on arrival
    back = runner.invoke(app, ["store", "copy", url, str(tmp_path / "back"), "--no-progress"])
    assert back.exit_code == 0, back.output
    assert (
        ActivationStore.open(tmp_path / "back").fingerprint
        == ActivationStore.open(local).fingerprint
    )
    # corrupt one object: verify names its chunk; a fresh cache refuses to use it
    key = f"{root}/activations/c/5/0"
    raw = bytearray(fs.cat_file(key))
    raw[40] ^= 0xFF
    fs.pipe_file(key, bytes(raw))
    bad = runner.invoke(app, ["store", "verify", url, "--no-progress"])
    assert bad.exit_code == 1 and "chunk 5 " in bad.output and "checksum mismatch" in bad.output
    assert "chunk 4 " not in bad.output
    fresh = ActivationStore.open(url, cache_dir=tmp_path / "fresh-cache")
    with pytest.raises(StoreError, match="chunk 5 of store .* recorded checksum"):
        fresh.read_chunk(5)
