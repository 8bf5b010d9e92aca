"""The probing task registry: packaged tasks load with their documented counts, sampling is
seeded and disjoint, the Hub loaders read local fixtures in the Hub datasets' schema, and
missing data gives one clear error."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from masksae.errors import ConfigError
from masksae.evaluate import tasks
from masksae.evaluate.tasks import (
    REGISTRY_LIST,
    TEST,
    TRAIN,
    TaskUnavailableError,
    get_spec,
    load_classes,
    load_ood,
    load_scr,
    pool_counts,
    sae_probes,
)
from masksae.evaluate.tasks.sampling import dedupe_labelled

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
PACKAGED = [s.name for s in REGISTRY_LIST if s.source == "sae-probes"]


def test_sae_probes_data_is_installed():
    """make setup installs the wheel (--no-deps); it must never be imported."""
    assert sae_probes.data_dir() is not None, sae_probes.INSTALL_HINT
    assert sae_probes.installed_version() == sae_probes.VERSION
    assert "sae_probes" not in sys.modules
    assert len(sae_probes.dataset_stems()) == 155
    assert sae_probes.dataset_stems(ood=True) == [
        "5_hist_fig_ismale",
        "6_hist_fig_isamerican",
        "7_hist_fig_ispolitician",
        "66_living-room",
        "67_social-security",
        "73_control-group",
        "87_glue_cola",
        "90_glue_qnli",
    ]


@pytest.mark.parametrize("name", PACKAGED)
def test_every_packaged_task_loads_with_its_documented_counts(name):
    spec = get_spec(name)
    assert spec.class_counts, f"{name} documents no class counts"
    assert pool_counts(name) == dict(spec.class_counts)
    assert "sae_probes" not in sys.modules


def test_label_encoding_is_the_reference_label_encoder():
    assert sae_probes.encode_labels(["not_bigram", "bigram", "bigram"]) == (
        [1, 0, 0],
        ["bigram", "not_bigram"],
    )
    rows = tasks.registry._ood_rows("90_glue_qnli")
    assert rows.label_names == ["1", "not_entailment"]  # the OOD file's own sorted strings
    assert rows.train_label_names == ["0", "1"]


def test_dedupe_drops_repeats_blanks_and_conflicts():
    pairs = [("a", "x"), ("b", "y"), ("a", "x"), ("c", "x"), ("c", "y"), (" ", "x"), ("d", "z")]
    assert dedupe_labelled(pairs) == [("a", "x"), ("b", "y"), ("d", "z")]


def test_class_sampling_is_seeded_balanced_and_disjoint():
    a = load_classes("world_country", 20, 7, seed=3)
    b = load_classes("world_country", 20, 7, seed=3)
    c = load_classes("world_country", 20, 7, seed=4)
    assert a.texts == b.texts and a.texts != c.texts
    assert a.label_names == ["Australia", "India", "Italy", "United_Kingdom", "United_States"]
    for label in range(5):
        assert len(a.indices(TRAIN, label)) == 20 and len(a.indices(TEST, label)) == 7
    train = {a.texts[i] for i in a.indices(TRAIN)}
    test = {a.texts[i] for i in a.indices(TEST)}
    assert not train & test and len(train) == 100 and len(test) == 35
    assert a.info["pool_counts"] == get_spec("world_country").class_counts


def test_scr_sampling_takes_2q_from_the_agreeing_quadrants():
    data = load_scr("hist_fig_politician_gender", 10, 4, seed=0)
    sizes = {(s, q): len(data.indices(s, q)) for s in (TRAIN, TEST) for q in range(4)}
    assert sizes == {
        (TRAIN, 0): 20,
        (TRAIN, 1): 10,
        (TRAIN, 2): 10,
        (TRAIN, 3): 20,
        (TEST, 0): 8,
        (TEST, 1): 4,
        (TEST, 2): 4,
        (TEST, 3): 8,
    }
    # quadrant 3 = (non-politician, male), 0 = (politician, female): the larger quadrants
    assert data.label_names == [
        "politician & female",
        "politician & male",
        "non-politician & female",
        "non-politician & male",
    ]
    assert len(set(data.texts)) == len(data.texts)
    # more than the task holds (71 per quadrant): shrunk, keeping the train:test ratio
    big = load_scr("hist_fig_politician_gender", 60, 20, seed=0)
    assert (big.info["q_train"], big.info["q_test"]) == (53, 18)
    assert len(big.indices(TRAIN, 0)) == 106 and len(big.indices(TEST, 1)) == 18


def test_ood_sampling_balances_the_training_draw():
    data = load_ood("5_hist_fig_ismale", 100, 1500, seed=42)
    tr = data.indices(TRAIN)
    assert len(tr) == 100 and data.labels[tr].sum() == 50
    assert len(data.indices(TEST)) == 299  # the whole OOD file
    train_pool = {t for t, _ in sae_probes.rows("5_hist_fig_ismale")[:1500]}
    assert {data.texts[i] for i in tr} <= train_pool


def test_wrong_kind_and_unknown_names_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown probing task 'nope'"):
        get_spec("nope")
    with pytest.raises(ConfigError, match="'news_topic' is a classes task, not a scr task"):
        get_spec("news_topic", "scr")
    generic = load_classes("sae_probes:113_movie_sent", 5, 5, seed=0)
    assert generic.label_names == ["0", "1"]


def test_missing_sae_probes_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sae_probes, "data_dir", lambda: None)
    with pytest.raises(TaskUnavailableError, match="pip install --no-deps sae-probes==0.4.2"):
        sae_probes.require_data_dir()
    ok, why = tasks.availability(get_spec("news_topic"))
    assert not ok and "sae-probes==0.4.2" in why


# ---------------------------------------------------------------- Hub loaders on fixtures
class FixtureDatasets(types.ModuleType):
    """``datasets`` reading tests/fixtures/hub/<id>/<config>/<split>.jsonl."""

    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__("datasets")
        self.calls: list[tuple] = []
        self.fail = fail

    def load_dataset(self, path, name=None, *, split=None, streaming=False, **kwargs):
        self.calls.append((path, name, split, streaming, kwargs))
        if self.fail is not None:
            raise self.fail
        file = FIXTURES / path.replace("/", "__") / (name or "default") / f"{split}.jsonl"
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        return iter(rows) if streaming else rows


@pytest.fixture()
def hub(monkeypatch):
    module = FixtureDatasets()
    monkeypatch.setitem(sys.modules, "datasets", module)
    tasks.registry._pools.cache_clear()
    yield module
    tasks.registry._pools.cache_clear()


def test_bias_in_bios_classes_are_gender_balanced(hub):
    data = load_classes("bias_in_bios_set1", 4, 2, seed=0)
    assert data.label_names == ["accountant", "architect", "attorney", "dentist", "filmmaker"]
    for label, name in enumerate(data.label_names):
        for split, n in ((TRAIN, 4), (TEST, 2)):
            texts = [data.texts[i] for i in data.indices(split, label)]
            assert len(texts) == n and all(f"a {name} (" for t in texts)
            assert all(f"a {name} ({'train' if split == TRAIN else 'test'}" in t for t in texts)
            assert sum(t.startswith("She") for t in texts) == n // 2  # half female
    assert hub.calls[0][0] == "LabHC/bias_in_bios"


def test_amazon_category_and_sentiment_loaders(hub):
    data = load_classes("amazon_category", 2, 2, seed=0)
    assert data.label_names == [
        "Toys_and_Games",
        "Cell_Phones_and_Accessories",
        "Industrial_and_Scientific",
        "Musical_Instruments",
        "Electronics",
    ]
    first = [data.texts[i] for i in data.indices(TRAIN, 0)]
    assert sorted("5.0" in t for t in first) == [False, True] and all(
        "Category 1 " in t for t in first
    )
    sent = load_classes("amazon_sentiment", 6, 4, seed=0)
    assert sent.label_names == ["1.0", "5.0"]
    assert all("rated 5.0" in sent.texts[i] for i in sent.indices(TEST, 1))


def test_ag_news_github_code_and_europarl_loaders(hub):
    news = load_classes("ag_news", 3, 2, seed=0)
    assert news.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert all("Topic 2 " in news.texts[i] for i in news.indices(TRAIN, 2))
    code = load_classes("github_code", 3, 2, seed=0)
    assert code.label_names == ["C", "Python", "HTML", "Java", "PHP"]
    assert all(code.texts[i].startswith("PHP code body") for i in code.indices(TEST, 4))
    call = next(c for c in hub.calls if c[0] == "codeparrot/github-code")
    assert call[3] is True and call[4]["languages"] == ["C", "Python", "HTML", "Java", "PHP"]
    euro = load_classes("europarl", 3, 2, seed=0)
    assert euro.label_names == ["en", "fr", "de", "es", "nl"]
    assert all(euro.texts[i].startswith("das Haus") for i in euro.indices(TRAIN, 2))
    assert {c[1] for c in hub.calls if c[0] == "Helsinki-NLP/europarl"} == {
        "en-fr",
        "fr-it",
        "de-en",
        "es-fr",
        "nl-pt",
    }


def test_hub_scr_quadrants(hub):
    data = load_scr("bias_in_bios_professor_nurse", 2, 1, seed=0)
    names = data.label_names
    assert names == ["nurse & female", "nurse & male", "professor & female", "professor & male"]
    for q, (job, pronoun) in enumerate(
        [("nurse", "She"), ("nurse", "He"), ("professor", "She"), ("professor", "He")]
    ):
        for i in data.indices(TRAIN, q):
            assert data.texts[i].startswith(f"{pronoun} works as a {job} (train")
    amazon = load_scr("amazon_books_cds_and_vinyl", 2, 1, seed=0)
    assert amazon.label_names[3] == "Books & 1-star"


def test_hub_unreachable_gives_the_offline_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FixtureDatasets(fail=ConnectionError("no route")))
    tasks.registry._pools.cache_clear()
    with pytest.raises(TaskUnavailableError, match="ConnectionError.*offline\\?.*sae-probes"):
        load_classes("ag_news", 2, 2, seed=0)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    tasks.registry._pools.cache_clear()
    with pytest.raises(TaskUnavailableError, match="pip install 'masksae\\[hub\\]'"):
        load_classes("ag_news", 2, 2, seed=0)
    tasks.registry._pools.cache_clear()


def test_tasks_list_cli_shows_availability(monkeypatch):
    from typer.testing import CliRunner

    from masksae.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(app, ["tasks", "list"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    news = next(line for line in lines if line.startswith("news_topic"))
    assert "classes" in news and "yes" in news and "Entertainment 1,224" in res.output
    bib = next(line for line in lines if line.startswith("bias_in_bios_set1"))
    assert "no" in bib
    assert "offline mode" in res.output or "needs `datasets`" in res.output
    res = CliRunner().invoke(app, ["tasks", "list", "--kind", "ood", "--details"])
    assert res.exit_code == 0, res.output
    rows = [line.split()[0] for line in res.output.splitlines()[2:] if line[:1].isalnum()]
    assert rows[:8] == [s.name for s in REGISTRY_LIST if s.kind == "ood"]
    assert "news_topic" not in res.output and "presets: " in res.output
    assert "8 of 8 task(s) available here" in res.output
    res = CliRunner().invoke(app, ["tasks", "list", "--kind", "nope"])
    assert res.exit_code == 2 and "--kind 'nope'" in res.output


@pytest.mark.parametrize("preset", ["demo", "offline", "tiny"])
def test_offline_presets_fit_their_tasks_documented_counts(preset):
    """Every offline preset's sizes fit the documented counts of its tasks (no run fails on
    'fewer texts than asked for')."""
    from masksae.evaluate.probing import probing_preset

    cfg = probing_preset(preset)
    cfg.validate()
    for section in (cfg.sparse_probing, cfg.tpp):
        for name in section.tasks:
            counts = get_spec(name, "classes").class_counts
            assert min(counts.values()) >= section.train_per_class + section.test_per_class, name
    for name in cfg.scr.tasks:
        spec = get_spec(name, "scr")
        pools = tasks.registry._pools(name, 0)
        assert sum(spec.class_counts.values()) == sum(len(v) for v in pools.train.values())
        q_train, q_test = tasks.registry.fit_quadrant_sizes(
            name, pools, cfg.scr.train_per_quadrant, cfg.scr.test_per_quadrant
        )
        assert q_train >= 4 * q_test / 3 >= 1 or preset == "tiny"
        for (a, b), texts in pools.train.items():
            assert len(texts) >= (2 if a == b else 1) * (q_train + q_test), (name, a, b)
    for name in cfg.ood.tasks:
        counts = get_spec(name, "ood").class_counts
        assert counts["in-distribution 0"] + counts["in-distribution 1"] >= cfg.ood.pool
