"""Harvest checks what needs only the model's config before loading its weights, and Hub
revisions (model and dataset) reach transformers / datasets and the store's provenance.

"Before loading the weights" is asserted, not timed: the weights loader is replaced by one
that fails the test.
"""

from __future__ import annotations

import itertools
import json
import sys
import types

import pytest
from typer.testing import CliRunner


@pytest.fixture()
def no_weights(monkeypatch):
    """Make any weights load fail the test (config and tokenizer loads still work)."""
    import transformers

    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(str(args[0]) if args else "?")
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


def _harvest(out, model, corpus, *extra):
    from masksae.cli import app

    args = [
        "harvest",
        "--out",
        str(out),
        "--model",
        str(model),
        "--corpus",
        str(corpus),
        "--tokens",
        "256",
        "--context-length",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        *map(str, extra),
    ]
    return CliRunner().invoke(app, args)


def test_bad_layer_and_compression_refused_before_weights(
    no_weights, tmp_path, tiny_model_dir, tiny_corpus_jsonl
):
    res = _harvest(tmp_path / "a", tiny_model_dir, tiny_corpus_jsonl, "--layer", 99)
    assert res.exit_code == 2, res.output
    assert "99" in res.output and "layer" in res.output
    res = _harvest(tmp_path / "b", tiny_model_dir, tiny_corpus_jsonl, "--compression", "zip:9")
    assert res.exit_code == 2, res.output
    assert "zip:9" in res.output
    assert no_weights == []
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing created


def test_missing_datasets_refused_before_weights(no_weights, monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not importable
    res = _harvest(tmp_path / "s", tiny_model_dir, "org/some-dataset", "--layer", 1)
    assert res.exit_code == 2, res.output
    assert "datasets" in res.output and "masksae[hub]" in res.output
    assert no_weights == []


def test_complete_store_and_mismatch_need_no_weights(
    monkeypatch, tmp_path, tiny_model_dir, tiny_corpus_jsonl
):
    out = tmp_path / "store"
    res = _harvest(out, tiny_model_dir, tiny_corpus_jsonl, "--layer", 1)
    assert res.exit_code == 0, res.output
    import transformers

    loads: list[str] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    from masksae.harvest import HarvestConfig, run_harvest

    cfg = HarvestConfig(
        out=str(out),
        model=str(tiny_model_dir),
        layer=1,
        corpus=str(tiny_corpus_jsonl),
        tokens=256,
        context_length=32,
        device="cpu",
    )
    result = run_harvest(cfg, progress=False)
    assert result.new_tokens == 0 and result.total_tokens == 256
    assert "nothing to compute" in result.summary()
    assert loads == []  # the complete store was recognised from the config and tokenizer
    # another seed is a provenance mismatch, refused before the weights too
    res = _harvest(out, tiny_model_dir, tiny_corpus_jsonl, "--layer", 1, "--seed", 5)
    assert res.exit_code == 2, res.output
    assert "seed" in res.output and "different settings" in res.output
    assert loads == []


# ------------------------------------------------------------------ Hub revisions (fakes)
class _RecordingDatasets(types.ModuleType):
    """A ``datasets`` stand-in streaming numbered sentences; records load_dataset's kwargs."""

    def __init__(self) -> None:
        super().__init__("datasets")
        self.calls: list[dict] = []

    def load_dataset(self, *args, **kwargs):
        self.calls.append(kwargs)
        return (
            {"text": f"the cat sat on a mat number {i} under green hills"}
            for i in itertools.count()
        )


def test_dataset_revision_and_config_reach_load_dataset_and_provenance(
    monkeypatch, tmp_path, tiny_model_dir
):
    from masksae.cli import app

    fake = _RecordingDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out = tmp_path / "store"
    hub = ("--dataset-revision", "abc123", "--dataset-config", "wikitext-2-raw-v1")
    res = _harvest(out, tiny_model_dir, "org/fake-wiki", "--layer", 1, "--mask-prob", 0, *hub)
    assert res.exit_code == 0, res.output
    assert fake.calls and all(
        kw
        == {"split": "train", "streaming": True, "name": "wikitext-2-raw-v1", "revision": "abc123"}
        for kw in fake.calls
    )
    from masksae.storage import ActivationStore

    corpus = ActivationStore(out).provenance["corpus"]
    assert corpus["revision"] == "abc123" and corpus["config"] == "wikitext-2-raw-v1"
    info = CliRunner().invoke(app, ["store", "info", str(out)])
    assert info.exit_code == 0 and "abc123" in info.output and "wikitext-2-raw-v1" in info.output
    # resuming with another dataset revision is a provenance mismatch
    other = ("--dataset-revision", "def456", "--dataset-config", "wikitext-2-raw-v1")
    res = _harvest(out, tiny_model_dir, "org/fake-wiki", "--layer", 1, "--mask-prob", 0, *other)
    assert res.exit_code == 2, res.output
    assert "corpus" in res.output and "different settings" in res.output
    # a dataset revision on a local corpus is refused (it would be silently ignored)
    res = _harvest(tmp_path / "x", tiny_model_dir, out / "zarr.json", "--layer", 1, *hub)
    assert res.exit_code == 2


def test_model_revision_reaches_transformers_and_provenance(
    monkeypatch, tmp_path, tiny_model_dir, tiny_corpus_jsonl
):
    """A Hub model id served from the tiny model folder by patched from_pretrained methods
    that record the revision they were asked for (the Hub is not reachable here)."""
    import transformers

    import masksae.hub_access

    asked: list[tuple[str, str | None]] = []

    def serve(cls_method, commit_of):
        def load(source, *args, **kwargs):
            revision = kwargs.pop("revision", None)
            if str(source) != str(tiny_model_dir):  # not transformers' own inner calls
                asked.append((str(source), revision))
            obj = cls_method(str(tiny_model_dir), *args, **kwargs)
            config = obj[0] if isinstance(obj, tuple) else getattr(obj, "config", obj)
            config._commit_hash = commit_of(revision)  # as the Hub resolves a revision
            return obj

        return load

    def commit(rev):
        return {"v1": "c" * 40, "v2": "d" * 40}.get(rev, "e" * 40)

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", serve(cls.from_pretrained, commit))
    tok = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda source, *a, **kw: (
            asked.append((source, kw.pop("revision", None))),
            tok(str(tiny_model_dir)),
        )[1],
    )
    monkeypatch.setattr(masksae.hub_access, "probe_hub", lambda *a, **k: None)
    out = tmp_path / "store"
    common = ("--layer", 1, "--revision")
    res = _harvest(out, "org/tiny-llama", tiny_corpus_jsonl, *common, "v1")
    assert res.exit_code == 0, res.output
    assert asked and all(src == "org/tiny-llama" and rev == "v1" for src, rev in asked)
    from masksae.storage import ActivationStore

    assert ActivationStore(out).provenance["model_revision"] == "c" * 40
    res = _harvest(out, "org/tiny-llama", tiny_corpus_jsonl, *common, "v2")
    assert res.exit_code == 2, res.output
    assert "model_revision" in res.output
    # --revision on a local folder is refused, not ignored
    res = _harvest(tmp_path / "y", tiny_model_dir, tiny_corpus_jsonl, *common, "v1")
    assert res.exit_code == 2 and "--revision" in res.output
    assert json.loads((out / "zarr.json").read_text())  # the store was left as it was
