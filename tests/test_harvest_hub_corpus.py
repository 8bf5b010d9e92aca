"""Hugging Face corpora through a fake ``datasets`` module: streaming, field, filters, errors."""

from __future__ import annotations

import itertools
import json
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from masksae.errors import CorpusError
from masksae.harvest import Corpus, CorpusSpec

PILE_CC = "green hills and rivers of light under the cat"
GITHUB = "seven eleven forty two numbers"


class FakeDatasets(types.ModuleType):
    """Stands in for ``datasets``: an endless stream alternating Pile-CC and Github records."""

    def __init__(self, fail: BaseException | None = None, fail_after: int | None = None):
        super().__init__("datasets")
        self.calls: list[tuple[tuple, dict]] = []
        self.pulled = 0
        self.fail, self.fail_after = fail, fail_after

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.fail is not None and self.fail_after is None:
            raise self.fail
        return self._stream()

    def _stream(self):
        for i in itertools.count():
            if self.fail_after is not None and i == self.fail_after:
                raise self.fail
            self.pulled += 1
            name = "Pile-CC" if i % 2 == 0 else "Github"
            text = f"{PILE_CC} {i}" if i % 2 == 0 else f"{GITHUB} {i}"
            yield {
                "content": text,
                "pile_set_name": name,
                "meta": json.dumps({"pile_set_name": name}),
            }  # meta as a JSON string


@pytest.fixture()
def fake_datasets(monkeypatch):
    def install(**kw) -> FakeDatasets:
        module = FakeDatasets(**kw)
        monkeypatch.setitem(sys.modules, "datasets", module)
        return module

    return install


@pytest.mark.parametrize("key", ["pile_set_name", "meta.pile_set_name"])
def test_hub_corpus_streams_with_field_and_filter(fake_datasets, key):
    fake = fake_datasets()
    corpus = Corpus(
        CorpusSpec(
            "org/fake-pile", field="content", filters=(f"{key}=Pile-CC",), split="validation"
        )
    )
    assert corpus.kind == "hub"
    docs = list(itertools.islice(corpus, 5))
    assert docs == [f"{PILE_CC} {i}" for i in (0, 2, 4, 6, 8)]
    assert fake.calls == [(("org/fake-pile",), {"split": "validation", "streaming": True})]
    assert fake.pulled == 9  # streamed lazily: only what the 5 documents needed
    assert corpus.describe() == {
        "source": "org/fake-pile",
        "kind": "hub",
        "field": "content",
        "filters": [f"{key}=Pile-CC"],
        "split": "validation",
    }


def test_hub_corpus_wrong_field_names_fields(fake_datasets):
    fake_datasets()
    with pytest.raises(
        CorpusError,
        match=r"no field 'text' \(fields: \['content', 'meta', "
        r"'pile_set_name'\]\).*--corpus-field",
    ):
        next(iter(Corpus(CorpusSpec("org/fake-pile"))))


def test_hub_connection_failure_gives_offline_hint(fake_datasets):
    fake_datasets(fail=ConnectionError("Couldn't reach 'org/fake-pile' on the Hub"))
    with pytest.raises(
        CorpusError,
        match=r"cannot open Hugging Face dataset 'org/fake-pile' "
        r"\(split 'train'\): ConnectionError.*offline\? use "
        r"--corpus bundled or a local path",
    ):
        next(iter(Corpus(CorpusSpec("org/fake-pile", field="content"))))
    fake_datasets(fail=ConnectionError("connection reset"), fail_after=3)
    corpus = Corpus(CorpusSpec("org/fake-pile", field="content"))
    with pytest.raises(
        CorpusError,
        match=r"reading Hugging Face dataset 'org/fake-pile' failed: "
        r"ConnectionError: connection reset.*offline\?",
    ):
        list(corpus)


def test_harvest_cli_from_hub_corpus(fake_datasets, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from masksae.cli import app
    from masksae.storage import ActivationStore

    fake = fake_datasets()
    out = tmp_path / "store"
    res = CliRunner().invoke(
        app,
        [
            "harvest",
            "--model",
            str(tiny_model_dir),
            "--layer",
            "1",
            "--corpus",
            "org/fake-pile",
            "--corpus-field",
            "content",
            "--corpus-filter",
            "pile_set_name=Pile-CC",
            "--tokens",
            "256",
            "--context-length",
            "32",
            "--mask-prob",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert all(kw == {"split": "train", "streaming": True} for _a, kw in fake.calls)
    store = ActivationStore.open(out)
    assert store.provenance["corpus"]["filters"] == ["pile_set_name=Pile-CC"]
    text = AutoTokenizer.from_pretrained(str(tiny_model_dir)).decode(
        np.asarray(store.read(0, store.n_tokens).token_ids).tolist()
    )
    assert "green hills" in text and "seven" not in text  # only Pile-CC records

    fake_datasets(fail=ConnectionError("Couldn't reach the Hub"))
    res = CliRunner().invoke(
        app,
        [
            "harvest",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            "org/fake-pile",
            "--out",
            str(tmp_path / "o2"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert res.exit_code == 2
    assert "'org/fake-pile'" in res.output and "offline? use --corpus bundled" in res.output
