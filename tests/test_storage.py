"""Tests of masksae.storage: round-trip, resume, torn chunks, verify, stream, stats, CLI."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from masksae.errors import ConfigError, ProvenanceMismatchError, StoreError
from masksae.storage import (
    ActivationStore,
    ChunkData,
    StoreSpec,
    StoreWriter,
    parse_compression,
)
from masksae.storage import layout as store_layout
from masksae.storage.schema import ARRAY_NAMES

N_TOKENS, D_MODEL, CHUNK = 1000, 24, 256  # 4 chunks, the last one shorter (232 tokens)
SEQ_LEN = 64
PROVENANCE = {"model": "tiny", "layer": 3, "mask": {"p": 0.2, "string": "..."}, "seed": 7}


def make_data(n_tokens: int = N_TOKENS, d_model: int = D_MODEL, seed: int = 0) -> ChunkData:
    """Synthetic per-token arrays; activations[:, 0] holds the token index (exact in fp32)."""
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n_tokens, d_model)).astype(np.float32)
    acts[:, 1] *= 30.0  # a heavy dimension
    acts[:, 0] = np.arange(n_tokens)
    position = (np.arange(n_tokens) % SEQ_LEN).astype(np.int32)
    return ChunkData(
        activations=acts,
        token_ids=rng.integers(0, 50_000, n_tokens).astype(np.int32),
        masked=rng.random(n_tokens) < 0.2,
        excluded=position == 0,
        seq_index=(np.arange(n_tokens) // SEQ_LEN).astype(np.int64),
        position=position,
    )


def make_spec(dtype: str = "float32", compression: str = "none", **provenance) -> StoreSpec:
    return StoreSpec(
        d_model=D_MODEL,
        dtype=dtype,
        chunk_tokens=CHUNK,
        total_tokens=N_TOKENS,
        provenance={**PROVENANCE, **provenance},
        compression=compression,
    )


def slice_data(data: ChunkData, start: int, stop: int, torch_acts: bool = False) -> ChunkData:
    fields = {name: getattr(data, name)[start:stop] for name in ARRAY_NAMES}
    if torch_acts:
        fields["activations"] = torch.from_numpy(fields["activations"])
    return ChunkData(**fields)


def write_store(
    path: Path, spec: StoreSpec, data: ChunkData, chunks=None, close: bool = True
) -> StoreWriter:
    writer = StoreWriter.open(path, spec)
    for index in range(writer.n_chunks) if chunks is None else chunks:
        start, stop = writer.chunk_bounds(index)
        writer.write_chunk(index, slice_data(data, start, stop, torch_acts=index % 2 == 0))
    if close:
        writer.close()
    else:
        writer.flush()
    return writer


def at_rest(acts: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(acts).to(getattr(torch, dtype))


@pytest.fixture(scope="module")
def data() -> ChunkData:
    return make_data()


@pytest.fixture(scope="module")
def f32_store(tmp_path_factory, data) -> ActivationStore:
    path = tmp_path_factory.mktemp("stores") / "f32"
    write_store(path, make_spec(), data)
    return ActivationStore.open(path)


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_bit_exact(tmp_path, data, dtype):
    write_store(tmp_path / "s", make_spec(dtype), data)
    store = ActivationStore.open(tmp_path / "s")
    assert store.is_complete and store.n_chunks == 4 and store.n_tokens == N_TOKENS
    assert store.dtype == getattr(torch, dtype)
    assert store.chunk_bounds(3) == (768, 1000)  # shorter last chunk
    back = store.read(0, N_TOKENS)
    assert torch.equal(back.activations_torch(dtype), at_rest(data.activations, dtype))
    for name in ARRAY_NAMES[1:]:
        got, want = getattr(back, name), getattr(data, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    part = store.read(200, 790)  # spans chunks 0..3
    assert torch.equal(part.activations_torch(dtype), at_rest(data.activations[200:790], dtype))
    assert np.array_equal(part.seq_index, data.seq_index[200:790])
    assert store.verify() == []


def test_bf16_bits_and_attributes(tmp_path, data):
    write_store(tmp_path / "s", make_spec("bfloat16"), data)
    attrs = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]
    assert attrs["storage_dtype"] == "bfloat16"
    assert attrs["provenance"] == PROVENANCE
    assert attrs["complete"] is True and attrs["chunks_complete"] == 4
    assert "excluded" in attrs["excluded_token_policy"]
    assert attrs["package_version"]
    assert attrs["spec"]["chunk_tokens"] == CHUNK
    assert attrs["statistics"]["n_tokens"] == int((~data.excluded).sum())
    raw = json.loads((tmp_path / "s" / "activations" / "zarr.json").read_text())
    assert raw["data_type"] == "uint16"
    store = ActivationStore.open(tmp_path / "s")
    assert attrs["fingerprint"] == store.fingerprint


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_caller_reuses_one_buffer_and_every_input_form_is_stored_alike(tmp_path, data, dtype):
    """write_chunk copies (into buffers the writer recycles): a caller that overwrites its
    one buffer right after each call still gets every chunk stored as handed over, and
    numpy / torch, float32 / float64 / the at-rest dtype / bf16 bits all store the same
    bytes as the reference conversion."""
    spec = make_spec(dtype)
    reference = at_rest(data.activations, dtype)
    forms = [
        lambda a: a,  # float32 numpy
        lambda a: a.astype(np.float64),
        lambda a: torch.from_numpy(a),
        lambda a: torch.from_numpy(a).to(getattr(torch, dtype)),
    ]
    if dtype == "bfloat16":  # raw bits, as numpy uint16 and torch int16
        forms += [
            lambda a: at_rest(a, dtype).view(torch.int16).numpy().view(np.uint16),
            lambda a: at_rest(a, dtype).view(torch.int16),
        ]
    for n, form in enumerate(forms):
        writer = StoreWriter.open(tmp_path / f"s{n}", spec, queue_size=1)
        shared = torch.empty((CHUNK, D_MODEL))  # the caller's one reused buffer
        for index in range(writer.n_chunks):
            start, stop = writer.chunk_bounds(index)
            shared[: stop - start] = torch.from_numpy(data.activations[start:stop])
            chunk = slice_data(data, start, stop)
            chunk.activations = form(shared[: stop - start].numpy())
            writer.write_chunk(index, chunk)
            shared.fill_(float("nan"))  # at once: the writer must hold its own copy
        writer.close()
        assert len(writer._spare_buffers) <= 2  # queue_size + 1 kept for reuse
        back = ActivationStore.open(tmp_path / f"s{n}").read(0, N_TOKENS)
        assert torch.equal(back.activations_torch(dtype), reference), n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("inner_bytes", [2048, 4 << 20])  # 12 or 6 / one inner chunk(s)
def test_plain_shards_written_directly_are_zarrs_bytes(tmp_path, data, dtype, inner_bytes):
    """Full plain shards are written by fastread.write_plain_shard (no zarr encode copies):
    every file of the store is byte for byte what zarr writes, and reads back and verifies."""
    from masksae.storage import fastread

    calls = []
    real = fastread.write_plain_shard

    def spy(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_layout, "_INNER_CHUNK_BYTES", inner_bytes)
        mp.setattr(fastread, "write_plain_shard", spy)
        write_store(tmp_path / "direct", make_spec(dtype), data)
        assert len(calls) == 3  # the three full chunks; zarr writes the short last one
        mp.setattr(StoreWriter, "_plain_inner_rows", lambda self: None)
        write_store(tmp_path / "zarr", make_spec(dtype), data)
    files = sorted(
        p.relative_to(tmp_path / "zarr")
        for p in (tmp_path / "zarr").rglob("*")
        if p.is_file() and "/c/" in f"/{p.relative_to(tmp_path / 'zarr')}"
    )
    assert len(files) == 4 * len(ARRAY_NAMES)
    for rel in files:
        assert (tmp_path / "direct" / rel).read_bytes() == (tmp_path / "zarr" / rel).read_bytes()
    store = ActivationStore.open(tmp_path / "direct")
    back = store.read(0, N_TOKENS).activations_torch(dtype)
    assert torch.equal(back, at_rest(data.activations, dtype)) and store.verify() == []
    assert store.fingerprint == ActivationStore.open(tmp_path / "zarr").fingerprint


@pytest.mark.parametrize("compression", ["zstd:1", "blosc-lz4-shuffle", "blosc-zstd-bitshuffle:3"])
def test_compressed_roundtrip(tmp_path, data, compression):
    write_store(tmp_path / "s", make_spec("bfloat16", compression), data)
    store = ActivationStore.open(tmp_path / "s")
    assert store.spec.compression == compression
    back = store.read(0, N_TOKENS).activations_torch("bfloat16")
    assert torch.equal(back, at_rest(data.activations, "bfloat16"))


def test_parse_compression_rejects_unknown():
    assert parse_compression("blosc-lz4").shuffle == "shuffle"
    for bad in ("lz5", "zstd:x", "blosc-lz4-twist", "none:3", "zstd:99"):
        with pytest.raises(ConfigError, match="compression"):
            parse_compression(bad)


def test_write_chunk_rejects_bad_shape(tmp_path, data):
    writer = StoreWriter.open(tmp_path / "s", make_spec())
    with pytest.raises(StoreError, match=r"chunk 1 activations have shape \(100, 24\)"):
        writer.write_chunk(1, slice_data(data, 256, 356))
    with pytest.raises(StoreError, match="chunk index 9 out of range"):
        writer.write_chunk(9, slice_data(data, 0, 256))
    writer.close()


# ---------------------------------------------------------------- resume and atomicity
def test_resume_after_crash_equals_uninterrupted(tmp_path, data):
    spec = make_spec("bfloat16", "zstd:1")
    write_store(tmp_path / "ref", spec, data)
    # "crash": chunks 0 and 2 done, the writer dropped without close
    crashed = write_store(tmp_path / "run", spec, data, chunks=[0, 2], close=False)
    del crashed
    # a torn chunk 1: data on disk, no completion record
    import zarr

    group = zarr.open_group(str(tmp_path / "run"), mode="r+")
    group["activations"][256:512] = np.full((256, D_MODEL), 7, dtype=np.uint16)
    assert not ActivationStore.open(tmp_path / "run", require_complete=False).is_complete
    writer = StoreWriter.open(tmp_path / "run", spec)
    assert writer.completed_chunks == frozenset({0, 2})
    for index in sorted(set(range(writer.n_chunks)) - writer.completed_chunks):
        writer.write_chunk(index, slice_data(data, *writer.chunk_bounds(index)))
    writer.close()
    ref, run = ActivationStore.open(tmp_path / "ref"), ActivationStore.open(tmp_path / "run")
    a, b = ref.read(0, N_TOKENS), run.read(0, N_TOKENS)
    for name in ARRAY_NAMES:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert ref.fingerprint == run.fingerprint
    assert ref.stats.to_dict() == run.stats.to_dict()
    attrs = json.loads((tmp_path / "run" / "zarr.json").read_text())["attributes"]
    assert attrs["statistics"] == ref.stats.to_dict() and attrs["complete"] is True


@pytest.mark.parametrize("fail_at", ["fsync_files", "write_manifest"])
def test_full_disk_leaves_chunk_incomplete(tmp_path, data, monkeypatch, fail_at):
    spec = make_spec()
    real = getattr(store_layout, fail_at)

    def fail_on_chunk_1(*args, **kwargs):
        index = args[1] if fail_at == "write_manifest" else None
        files = args[0] if fail_at == "fsync_files" else None
        if index == 1 or (files and files[0].parent.name == "1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_layout, fail_at, fail_on_chunk_1)
    writer = StoreWriter.open(tmp_path / "s", spec)
    with pytest.raises(StoreError, match=r"writing chunk 1 .*No space left"):
        for index in range(writer.n_chunks):
            writer.write_chunk(index, slice_data(data, *writer.chunk_bounds(index)))
        writer.close()
    monkeypatch.setattr(store_layout, fail_at, real)
    assert 1 not in ActivationStore.open(tmp_path / "s", require_complete=False).completed_chunks
    resumed = StoreWriter.open(tmp_path / "s", spec)
    assert 1 not in resumed.completed_chunks and 0 in resumed.completed_chunks
    for index in sorted(set(range(resumed.n_chunks)) - resumed.completed_chunks):
        resumed.write_chunk(index, slice_data(data, *resumed.chunk_bounds(index)))
    resumed.close()
    store = ActivationStore.open(tmp_path / "s")
    assert store.verify() == []
    assert np.array_equal(store.read(0, N_TOKENS).activations, data.activations)


def test_missing_record_is_incomplete_and_verify_names_it(tmp_path, data):
    from masksae.cli import app

    write_store(tmp_path / "s", make_spec(), data)
    store_layout.manifest_path(tmp_path / "s", 1).unlink()  # data written, record lost
    with pytest.raises(StoreError, match=r"1 of 4 chunks missing \(1\).*rerun the harvest"):
        ActivationStore.open(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", require_complete=False)
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("chunk 1 ") and "missing" in problems[0]
    result = CliRunner().invoke(app, ["store", "verify", str(tmp_path / "s"), "--no-progress"])
    assert result.exit_code == 1 and "chunk 1 " in result.output
    with pytest.raises(StoreError, match="incomplete chunks"):
        store.read(250, 300)
    assert StoreWriter.open(tmp_path / "s", make_spec()).completed_chunks == {0, 2, 3}


def test_corrupted_chunk_found_by_verify(tmp_path, data):
    from masksae.cli import app

    write_store(tmp_path / "s", make_spec(), data)
    shard = tmp_path / "s" / "activations" / "c" / "2" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # flip a byte inside the data of chunk 2
    shard.write_bytes(bytes(raw))
    ok = CliRunner().invoke(app, ["store", "verify", str(tmp_path / "s"), "--no-progress"])
    assert ok.exit_code == 1 and "chunk 2 " in ok.output and "checksum mismatch" in ok.output
    assert "chunk 0 " not in ok.output
    problems = ActivationStore.open(tmp_path / "s").verify()
    assert [p.split(" (")[0] for p in problems] == ["chunk 2"]


def test_verify_names_a_missing_shard_file(tmp_path, data):
    write_store(tmp_path / "s", make_spec(), data)
    (tmp_path / "s" / "masked" / "c" / "1").unlink()  # lost in a partial copy, say
    problems = ActivationStore.open(tmp_path / "s", require_complete=False).verify()
    assert len(problems) == 1
    assert (
        problems[0].startswith("chunk 1 ") and "shard file(s) missing (masked/c/1)" in problems[0]
    )


@pytest.mark.parametrize("name", ARRAY_NAMES)
def test_reader_refuses_a_complete_chunk_with_a_missing_shard(tmp_path, data, name):
    write_store(tmp_path / "s", make_spec(), data)
    store_layout.chunk_files(tmp_path / "s", 2)[ARRAY_NAMES.index(name)].unlink()
    with pytest.raises(StoreError, match=rf"chunk 2: shard file\(s\) missing \({name}/c/2"):
        ActivationStore.open(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", require_complete=False)
    assert store.missing_chunks == [2] and not store.is_complete
    with pytest.raises(StoreError, match="incomplete chunks"):
        store.read(2 * CHUNK, 2 * CHUNK + 1)


def test_all_fill_chunks_are_written_and_verify(tmp_path):
    """A chunk whose values all equal the fill value (zeros, False) still gets every shard
    file, verifies, and reads back equal through plain zarr (the p = 0 `masked` case)."""
    import zarr

    data = make_data()
    data.activations[: 2 * CHUNK] = 0.0  # chunks 0 and 1: all-zero activations
    data.masked[:] = False  # p = 0: every `masked` chunk is all fill value
    data.excluded[CHUNK : 2 * CHUNK] = False
    data.token_ids[CHUNK : 2 * CHUNK] = 0
    for compression in ("none", "zstd:1"):
        path = tmp_path / compression.replace(":", "")
        write_store(path, make_spec(compression=compression), data)
        for index in range(4):
            assert store_layout.missing_chunk_files(path, index) == []
        store = ActivationStore.open(path)
        assert store.verify() == []
        group = zarr.open_group(str(path), mode="r")
        for name in ARRAY_NAMES:
            assert np.array_equal(np.asarray(group[name][:]), getattr(data, name)), name


def test_rerunning_the_writer_repairs_a_store_missing_all_fill_shards(tmp_path):
    """Stores written by masksae 0.1.0 lack the shards of all-fill chunks: their records are
    treated as incomplete, and resuming the writer (rerunning the harvest) rewrites them."""
    data = make_data()
    data.masked[:] = False
    spec = make_spec()
    write_store(tmp_path / "s", spec, data)
    for index in (0, 3):  # what zarr without write_empty_chunks left out
        (tmp_path / "s" / "masked" / "c" / str(index)).unlink()
    assert len(ActivationStore.open(tmp_path / "s", require_complete=False).verify()) == 2
    writer = StoreWriter.open(tmp_path / "s", spec)
    assert writer.completed_chunks == {1, 2}
    for index in (0, 3):
        start, stop = writer.chunk_bounds(index)
        writer.write_chunk(index, slice_data(data, start, stop))
    writer.close()
    store = ActivationStore.open(tmp_path / "s")
    assert store.verify() == [] and store.is_complete
    assert np.array_equal(store.read(0, N_TOKENS).activations, data.activations)


def test_verify_cli_good_store(f32_store):
    from masksae.cli import app

    result = CliRunner().invoke(app, ["store", "verify", str(f32_store.path), "--no-progress"])
    assert result.exit_code == 0 and "OK: all 4 chunks" in result.output
    result = CliRunner().invoke(
        app, ["store", "verify", str(f32_store.path), "--json", "--no-progress"]
    )
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report == {
        "path": str(f32_store.path),
        "ok": True,
        "store_problems": [],
        "n_chunks": 4,
        "n_bad_chunks": 0,
        "n_tokens": N_TOKENS,
        "fingerprint": f32_store.fingerprint,
        "bad_chunks": [],
    }


def test_verify_cli_json_names_bad_chunks(tmp_path, data):
    from masksae.cli import app

    write_store(tmp_path / "s", make_spec(), data)
    shard = tmp_path / "s" / "activations" / "c" / "2" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    store_layout.manifest_path(tmp_path / "s", 3).unlink()
    result = CliRunner().invoke(
        app, ["store", "verify", str(tmp_path / "s"), "--json", "--no-progress"]
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["n_bad_chunks"] == 2 and report["n_chunks"] == 4
    bad = report["bad_chunks"]
    assert [(b["index"], b["start"], b["stop"]) for b in bad] == [(2, 512, 768), (3, 768, 1000)]
    assert "checksum mismatch" in bad[0]["problem"] and "missing" in bad[1]["problem"]


def test_record_extra_fields_and_outlier_count_in_info(tmp_path, data):
    from masksae.storage.commands import _format_info, store_summary

    writer = StoreWriter.open(tmp_path / "s", make_spec())
    with pytest.raises(StoreError, match=r"may not set \['checksum'\]"):
        writer.write_chunk(0, slice_data(data, 0, CHUNK), record_extra={"checksum": "x"})
    for index in range(writer.n_chunks):
        start, stop = writer.chunk_bounds(index)
        writer.write_chunk(
            index, slice_data(data, start, stop), record_extra={"n_norm_outliers": index}
        )
    writer.close()
    store = ActivationStore.open(tmp_path / "s")
    assert [store.records[i]["n_norm_outliers"] for i in range(4)] == [0, 1, 2, 3]
    summary = store_summary(tmp_path / "s")
    n_excluded = int(np.asarray(data.excluded).sum())
    assert summary["tokens_excluded"] == n_excluded and summary["tokens_norm_outliers"] == 6
    assert f"excluded     {n_excluded - 6} special/position-0, 6 norm outliers" in _format_info(
        summary
    )


# ---------------------------------------------------------------- opening errors
def test_provenance_mismatch_names_every_key(tmp_path, data):
    write_store(tmp_path / "s", make_spec(), data)
    other = StoreSpec(
        d_model=D_MODEL,
        dtype="float32",
        chunk_tokens=CHUNK,
        total_tokens=N_TOKENS,
        provenance={**PROVENANCE, "layer": 4, "mask": {"p": 0.5, "string": "..."}},
        compression="zstd:1",
    )
    with pytest.raises(ProvenanceMismatchError) as info:
        StoreWriter.open(tmp_path / "s", other)
    message = str(info.value)
    assert "provenance.layer: store has 3, requested 4" in message
    assert "provenance.mask.p: store has 0.2, requested 0.5" in message
    assert "compression: store has 'none', requested 'zstd:1'" in message
    assert "--out" in message and "delete" in message
    assert "provenance.seed" not in message


def test_refuses_non_store_paths(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="non-empty directory that is not an activation store"):
        StoreWriter.open(tmp_path / "busy", make_spec())
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter.open(tmp_path / "file", make_spec())
    with pytest.raises(StoreError, match="does not exist"):
        ActivationStore.open(tmp_path / "nope")
    with pytest.raises(StoreError, match="not a masksae activation store"):
        ActivationStore.open(tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    StoreWriter.open(tmp_path / "empty", make_spec()).close()  # an empty dir is fine
    assert ActivationStore.open(tmp_path / "empty", require_complete=False).n_chunks == 4


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_match_numpy(tmp_path, data, dtype):
    write_store(tmp_path / "s", make_spec(dtype), data)
    store = ActivationStore.open(tmp_path / "s")
    x = at_rest(data.activations, dtype).double().numpy()[~data.excluded]
    stats = store.stats
    assert stats.n_tokens == x.shape[0]
    np.testing.assert_allclose(stats.mean_D, x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.var_D, x.var(0), rtol=1e-9)
    norms = np.linalg.norm(x, axis=1)
    assert stats.mean_norm == pytest.approx(norms.mean(), rel=1e-12)
    assert stats.mean_sq_norm == pytest.approx((norms**2).mean(), rel=1e-12)
    s = store.norm_scale()
    assert s == pytest.approx(np.sqrt(D_MODEL / (norms**2).mean()), rel=1e-12)
    assert ((s * norms) ** 2).mean() == pytest.approx(D_MODEL, rel=1e-9)


def test_count_tokens(f32_store, data):
    excl, masked = data.excluded, data.masked
    assert f32_store.count_tokens() == int((~excl).sum())
    assert f32_store.count_tokens(include_masked=False) == int((~excl & ~masked).sum())
    assert f32_store.count_tokens(include_excluded=True) == N_TOKENS
    assert f32_store.count_tokens(include_excluded=True, include_masked=False) == int(
        (~masked).sum()
    )
    assert f32_store.count_tokens(chunk_range=(3, 4)) == int((~excl[768:]).sum())


# ---------------------------------------------------------------- stream
def stream_ids(store: ActivationStore, batch_size: int = 32, **kwargs) -> list[np.ndarray]:
    """Token indices (column 0) of every batch."""
    kwargs.setdefault("shuffle_buffer_tokens", 128)
    return [b[:, 0].to(torch.int64).numpy() for b in store.stream(batch_size, **kwargs)]


def test_stream_determinism_and_shape(f32_store):
    first = list(f32_store.stream(32, seed=3, shuffle_buffer_tokens=128))
    again = list(f32_store.stream(32, seed=3, shuffle_buffer_tokens=128))
    other = list(f32_store.stream(32, seed=4, shuffle_buffer_tokens=128))
    assert all(b.shape == (32, D_MODEL) and b.dtype == torch.float32 for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=False))
    half = next(iter(f32_store.stream(32, seed=3, dtype=torch.bfloat16)))
    assert half.dtype == torch.bfloat16


def test_stream_covers_every_token_once(f32_store, data):
    usable = np.flatnonzero(~data.excluded)
    for buffer_tokens in (64, 128, 10_000):
        ids = np.concatenate(stream_ids(f32_store, 32, seed=1, shuffle_buffer_tokens=buffer_tokens))
        assert len(ids) == len(usable) // 32 * 32  # only the last partial batch is dropped
        assert len(np.unique(ids)) == len(ids) and set(ids) <= set(usable)
        assert not np.all(np.diff(ids) > 0)  # shuffled
    # chunks get mixed: the first batches draw from more than one chunk
    first = stream_ids(f32_store, 32, seed=1, shuffle_buffer_tokens=512)[0]
    assert len(set(first // CHUNK)) > 1


def test_stream_filters_masked_and_excluded(f32_store, data):
    ids = np.concatenate(stream_ids(f32_store, 16, seed=0, include_masked=False))
    keep = np.flatnonzero(~data.excluded & ~data.masked)
    assert len(ids) == len(keep) // 16 * 16 and set(ids) <= set(keep)
    ids = np.concatenate(stream_ids(f32_store, 8, seed=0, include_excluded=True))
    assert len(ids) == N_TOKENS and set(ids) == set(range(N_TOKENS))


def test_stream_chunk_range(f32_store, data):
    ids = np.concatenate(stream_ids(f32_store, 16, seed=0, chunk_range=(1, 3)))
    keep = np.flatnonzero(~data.excluded[256:768]) + 256
    assert len(ids) == len(keep) // 16 * 16 and set(ids) <= set(keep)
    with pytest.raises(StoreError, match="chunk_range"):
        f32_store.stream(16, chunk_range=(2, 9))


def test_stream_skip_batches_equivalence(f32_store):
    full = stream_ids(f32_store, 32, seed=5, epochs=2)
    per_epoch = f32_store.batches_per_epoch(32)
    assert len(full) == 2 * per_epoch
    # epochs differ in order but each covers the same tokens (bar its dropped partial batch)
    epoch0, epoch1 = set(np.concatenate(full[:per_epoch])), set(np.concatenate(full[per_epoch:]))
    assert len(epoch0) == len(epoch1) == per_epoch * 32
    assert len(epoch0 & epoch1) > per_epoch * 32 - 32
    assert not np.array_equal(full[0], full[per_epoch])
    for skip in (1, 7, per_epoch, per_epoch + 3, 2 * per_epoch):
        rest = stream_ids(f32_store, 32, seed=5, epochs=2, skip_batches=skip)
        assert len(rest) == len(full) - skip
        assert all(np.array_equal(a, b) for a, b in zip(full[skip:], rest, strict=True))


def test_stream_early_stop_releases_thread(f32_store):
    import threading

    stream = f32_store.stream(16, seed=0, prefetch=1)
    next(stream)
    stream.close()
    assert not any(
        t.name == "masksae-store-prefetch" and t.is_alive() for t in threading.enumerate()
    )


# ---------------------------------------------------------------- info CLI
def test_info_cli(f32_store, data):
    from masksae.cli import app

    runner = CliRunner()
    text = runner.invoke(app, ["store", "info", str(f32_store.path)])
    assert text.exit_code == 0, text.output
    assert "4/4 complete" in text.output and "compression  none" in text.output
    assert '"tiny"' in text.output and "mean norm" in text.output
    out = runner.invoke(app, ["store", "info", str(f32_store.path), "--json"])
    assert out.exit_code == 0
    info = json.loads(out.output)
    assert info["provenance"] == PROVENANCE and info["n_tokens"] == N_TOKENS
    assert info["chunks_complete"] == info["chunks_total"] == 4 and info["complete"]
    assert info["tokens_usable"] == int((~data.excluded).sum())
    assert info["statistics"]["mean_norm"] == pytest.approx(f32_store.stats.mean_norm)
    assert info["compression_ratio"] > 0.5 and info["size_on_disk_bytes"] > 0
    missing = runner.invoke(app, ["store", "info", str(f32_store.path.parent / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_stream_zero_copy_path_equals_zarr_path(tmp_path, data, monkeypatch):
    """Uncompressed shards are read via mmap views, compressed ones via zarr: same batches.

    Small inner chunks (64 rows) make every shard hold several, the last one partial.
    """
    monkeypatch.setattr(store_layout, "_INNER_CHUNK_BYTES", 64 * D_MODEL * 2)
    write_store(tmp_path / "plain", make_spec("bfloat16", "none"), data)
    write_store(tmp_path / "zstd", make_spec("bfloat16", "zstd:1"), data)
    plain, packed = (
        ActivationStore.open(tmp_path / "plain"),
        ActivationStore.open(tmp_path / "zstd"),
    )
    views = plain.activation_views(3)
    # inner chunks written back to back come as one view (232 rows in the last chunk)
    assert [v.shape[0] for v in views] == [232]
    assert packed.activation_views(0) is None
    for kwargs in ({}, {"include_masked": False}, {"include_excluded": True}):
        a = list(plain.stream(32, seed=2, shuffle_buffer_tokens=96, epochs=2, **kwargs))
        b = list(packed.stream(32, seed=2, shuffle_buffer_tokens=96, epochs=2, **kwargs))
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    ids = np.concatenate(
        [x[:, 0].to(torch.int64).numpy() for x in plain.stream(8, seed=0, include_excluded=True)]
    )
    # column 0 holds the token index; bf16 rounds large indices, so compare rounded values
    expect = torch.from_numpy(data.activations[:, 0]).to(torch.bfloat16).to(torch.int64).numpy()
    assert sorted(ids) == sorted(expect)


def test_stream_row_references_equal_row_copies(tmp_path, data, monkeypatch):
    """Local plain stores fill the shuffle buffer with (source, row) references into the
    mapped shards; the batches equal those of the copying buffer, and sources no slot
    points into any more are released."""
    from masksae.storage import stream as stream_mod

    monkeypatch.setattr(store_layout, "_INNER_CHUNK_BYTES", 64 * D_MODEL * 2)
    write_store(tmp_path / "plain", make_spec("bfloat16", "none"), data)
    store = ActivationStore.open(tmp_path / "plain")
    assert store.memory_mapped_reads()
    held: list[int] = []
    real_fill = stream_mod._RowReferences.fill

    def counting_fill(self, slots, segments):
        n = real_fill(self, slots, segments)
        held.append(len(self._arrays))
        return n

    monkeypatch.setattr(stream_mod._RowReferences, "fill", counting_fill)
    cases = [
        {"shuffle_buffer_tokens": 96, "epochs": 2},
        {"shuffle_buffer_tokens": 64, "include_masked": False, "skip_batches": 5},
        {"shuffle_buffer_tokens": 10_000, "include_excluded": True},  # one partial fill
        {"shuffle_buffer_tokens": 256, "dtype": torch.bfloat16, "chunk_range": (1, 4)},
    ]
    by_reference = [list(store.stream(16, seed=4, **kw)) for kw in cases]
    assert held and max(held) <= store.n_chunks  # a source per mapped chunk at most
    monkeypatch.setattr(ActivationStore, "memory_mapped_reads", lambda self: False)
    by_copy = [list(store.stream(16, seed=4, **kw)) for kw in cases]
    for a, b in zip(by_reference, by_copy, strict=True):
        assert len(a) == len(b) > 0
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_shard_views_merge_only_adjacent_inner_chunks():
    from masksae.storage.fastread import buffer_views

    d, inner, dtype = 3, 2, np.dtype(np.float32)
    rows = np.arange(4 * inner * d, dtype=np.float32).reshape(-1, d)  # 4 inner chunks
    row_bytes = d * 4
    # inner chunks stored in the order 0, 1, 3, 2: views [0, 1], [2], [3] in row order
    order = [0, 1, 3, 2]
    payload = b"".join(rows[j * inner : (j + 1) * inner].tobytes() for j in order)
    index = np.zeros((4, 2), dtype="<u8")
    for position, j in enumerate(order):
        index[j] = (position * inner * row_bytes, inner * row_bytes)
    raw = np.frombuffer(payload + index.tobytes() + b"\0" * 4, dtype=np.uint8)
    views = buffer_views(raw, 4 * inner, d, dtype, inner, 4)
    assert [v.shape[0] for v in views] == [2 * inner, inner, inner]
    assert np.array_equal(np.concatenate(views), rows)


def test_stream_bf16_output_and_errors(f32_store):
    with pytest.raises(ConfigError, match="batch_size"):
        f32_store.stream(0)
    with pytest.raises(StoreError, match="fewer than batch_size"):
        f32_store.stream(10_000)
    batch = next(iter(f32_store.stream(16, dtype="bf16")))
    assert batch.dtype == torch.bfloat16 and batch.shape == (16, D_MODEL)


_KILL_SCRIPT = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_storage as t
from masksae.storage import StoreWriter, layout

real = layout.write_manifest
def die_on_chunk_2(path, index, record):
    if index == 2:  # chunk 2's data is on disk, its record is not: SIGKILL now
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, index, record)
layout.write_manifest = die_on_chunk_2
data = t.make_data()
writer = StoreWriter.open({path!r}, t.make_spec("bfloat16"))
for index in range(writer.n_chunks):
    writer.write_chunk(index, t.slice_data(data, *writer.chunk_bounds(index)))
writer.close()
"""


def test_sigkill_mid_chunk_then_resume(tmp_path, data):
    import signal
    import subprocess
    import sys

    path = tmp_path / "s"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (path / "activations" / "c" / "2" / "0").exists()  # the torn chunk's data
    store = ActivationStore.open(path, require_complete=False)
    assert store.completed_chunks == {0, 1} and not store.is_complete
    writer = StoreWriter.open(path, make_spec("bfloat16"))
    assert writer.completed_chunks == {0, 1}
    for index in (2, 3):
        writer.write_chunk(index, slice_data(data, *writer.chunk_bounds(index)))
    writer.close()
    write_store(tmp_path / "ref", make_spec("bfloat16"), data)
    resumed, ref = ActivationStore.open(path), ActivationStore.open(tmp_path / "ref")
    assert resumed.verify() == [] and resumed.fingerprint == ref.fingerprint
    assert resumed.stats.to_dict() == ref.stats.to_dict()


def test_second_process_cannot_write_the_same_store(tmp_path):
    import subprocess
    import sys

    writer = StoreWriter.open(tmp_path / "s", make_spec())
    script = (
        "import sys; sys.path.insert(0, {t!r}); import test_storage as t\n"
        "from masksae.storage import StoreWriter\n"
        "StoreWriter.open({p!r}, t.make_spec())\n"
    ).format(t=str(Path(__file__).parent), p=str(tmp_path / "s"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode != 0 and b"is being written by pid" in proc.stderr
    writer.close()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_stream_batches_are_in_random_order(f32_store):
    """Not just a random set: rows inside a batch carry no order of the token index."""
    batches = stream_ids(f32_store, 128, seed=0, shuffle_buffer_tokens=512)
    corr = [abs(np.corrcoef(np.arange(len(b)), b)[0, 1]) for b in batches]
    assert len(batches) == 7 and np.mean(corr) < 0.3
