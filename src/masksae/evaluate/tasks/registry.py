"""The probing task registry: every task the probing metrics can run, where its texts come
from, its labels and documented class counts, its licence, and whether it is available here.

Three kinds of task:
- ``classes``: texts with one class label (sparse probing, TPP): one-vs-rest probes per class.
- ``scr``: texts carrying two binary attributes (a target and a spuriously correlated one),
  grouped in four quadrants (SCR).
- ``ood``: a binary in-distribution training set and an out-of-distribution test file
  (Kantamneni et al.'s OOD probing).

Sources: ``sae-probes`` (Kantamneni et al.'s datasets shipped in the ``sae-probes`` 0.4.2 wheel,
offline) and ``hub`` (SAEBench's datasets on the Hugging Face Hub). Any other binary or
multi-class sae-probes file can be named ``sae_probes:<file stem>`` (a ``classes`` task).

Documented ``class_counts`` are what the loader yields after de-duplication (see
:mod:`masksae.evaluate.tasks.sampling`); ``tests/test_probing_tasks.py`` checks every
packaged task against them. Hub tasks document SAEBench's chosen classes instead (their
counts are the Hub's).

Probing texts are never SAE training data: the harvest reads the bundled corpus (gensim's
Wikipedia excerpt and Lee news), local files or a Hub corpus such as Pile-CC; these tasks
read only the sae-probes data files and SAEBench's Hub datasets, and the evaluator refuses a
checkpoint whose store was harvested from one of these sources (see
:func:`masksae.evaluate.probing.suite.check_disjoint`). What stays possible is an overlap of
content, not of files: some sae-probes texts (the wikidata and phrase sets of Gurnee et al.)
were cut from the Pile, so a Pile-CC harvest may contain a few of the same passages.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from masksae.errors import ConfigError
from masksae.evaluate.tasks import hub, sae_probes
from masksae.evaluate.tasks.data import TaskData, TaskUnavailableError
from masksae.evaluate.tasks.sampling import (
    ClassPools,
    QuadrantPools,
    dedupe_labelled,
    sample_classes,
    sample_ood,
    sample_quadrants,
)

log = logging.getLogger(__name__)

KINDS = ("classes", "scr", "ood")
SAE_PROBES_LICENCE = "MIT (sae-probes wheel)"
GENERIC_PREFIX = "sae_probes:"


@dataclass(frozen=True)
class TaskSpec:
    """One registered probing task."""

    name: str
    """Name used in the ``--*-tasks`` lists and in result files."""
    kind: str
    """"classes", "scr" or "ood"."""
    source: str
    """"sae-probes" (packaged, offline) or "hub" (Hugging Face Hub)."""
    dataset: str
    """File stem(s) inside the sae-probes data, or the Hub dataset id (and configuration)."""
    description: str
    """What the task asks."""
    labels: str
    """Label column(s) and values."""
    split: str
    """Where the train and test texts come from."""
    licence: str
    """Licence of the data as published (the underlying source may add terms)."""
    class_counts: Mapping[str, int] = field(default_factory=dict)
    """Documented texts per class (``scr``: per quadrant; ``ood``: in-distribution and OOD
    per label). Empty for Hub tasks, whose counts are the Hub's."""
    origin: str = ""
    """Where the data was collected from originally."""
    notes: str = ""
    """Anything a user should know (label quirks, deviations)."""
    pooling: str = "mean"
    """How sparse probing, SCR and TPP pool a text's tokens: "mean" (SAEBench) or "last"
    (the last token, for datasets built for last-token probing)."""
    loader: Callable[[int], Any] | None = field(default=None, repr=False, compare=False)
    """Returns the task's pools given the largest per-class count wanted (streams use it)."""

    def describe_counts(self) -> str:
        if not self.class_counts:
            return ""
        return ", ".join(f"{k} {v:,}" for k, v in self.class_counts.items())


# ---------------------------------------------------------------------------- sae-probes
def _file_pools(stem: str, names: Mapping[str, str] | None = None) -> ClassPools:
    """A binary or multi-class sae-probes file as class pools (classes in sorted target order,
    the reference's label encoding); ``names`` renames target strings for display."""
    pairs = dedupe_labelled(sae_probes.rows(stem))
    classes = sorted({y for _, y in pairs})
    shown = [(names or {}).get(c, c) for c in classes]
    return ClassPools(
        shown, {n: [[t for t, y in pairs if y == c]] for c, n in zip(classes, shown, strict=True)}
    )


def _positives_pools(stems: Mapping[str, str]) -> ClassPools:
    """A multi-class task built from the positives of several binary files ({name: stem})."""
    pairs = dedupe_labelled(
        (t, name) for name, stem in stems.items() for t, y in sae_probes.rows(stem) if y == "1"
    )
    names = list(stems)
    return ClassPools(names, {n: [[t for t, y in pairs if y == n]] for n in names})


@dataclass(frozen=True)
class Attribute:
    """One binary attribute of an SCR task read from a sae-probes file."""

    stem: str
    """sae-probes file holding the attribute's labels."""
    name: str
    """Attribute name ("gender")."""
    positive: str
    """Target string of the positive value (quadrant index 1)."""
    negative: str
    """Target string of the negative value (quadrant index 0)."""
    positive_name: str
    negative_name: str


def _pair_pools(target: Attribute, spurious: Attribute) -> QuadrantPools:
    """Texts present in both files (joined on the exact prompt), by quadrant."""
    first = dict(dedupe_labelled(sae_probes.rows(target.stem)))
    second = dict(dedupe_labelled(sae_probes.rows(spurious.stem)))
    quadrants: dict[tuple[int, int], list[str]] = {(a, b): [] for a in (0, 1) for b in (0, 1)}
    for text, y1 in first.items():
        y2 = second.get(text)
        if y2 is None:
            continue
        a = {target.positive: 1, target.negative: 0}.get(y1)
        b = {spurious.positive: 1, spurious.negative: 0}.get(y2)
        if a is not None and b is not None:
            quadrants[(a, b)].append(text)
    return QuadrantPools(
        (target.name, spurious.name),
        (
            (target.negative_name, target.positive_name),
            (spurious.negative_name, spurious.positive_name),
        ),
        quadrants,
    )


@dataclass(frozen=True)
class OodRows:
    """An OOD task's rows: (text, label) of the in-distribution file and of the OOD file."""

    train: tuple[tuple[str, int], ...]
    ood: tuple[tuple[str, int], ...]
    label_names: list[str]
    train_label_names: list[str]


def _ood_rows(stem: str) -> OodRows:
    """The reference's encoding applied to each file separately (their get_yvals and
    get_xy_OOD both run a fresh LabelEncoder)."""
    train = sae_probes.rows(stem)
    ood = sae_probes.rows(stem, ood=True)
    y_train, train_names = sae_probes.encode_labels([y for _, y in train])
    y_ood, ood_names = sae_probes.encode_labels([y for _, y in ood])
    if len(train_names) != 2 or len(ood_names) != 2:
        raise TaskUnavailableError(
            f"OOD task {stem}: expected binary labels, found {train_names} / {ood_names}"
        )
    return OodRows(
        tuple((t, y) for (t, _), y in zip(train, y_train, strict=True)),
        tuple((t, y) for (t, _), y in zip(ood, y_ood, strict=True)),
        ood_names,
        train_names,
    )


def _sp_classes(
    name: str,
    stem: str,
    description: str,
    labels: str,
    counts: dict[str, int],
    origin: str,
    names: dict[str, str] | None = None,
    notes: str = "",
) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="classes",
        source="sae-probes",
        dataset=f"cleaned_data/{stem}",
        description=description,
        labels=labels,
        split="one file: test texts drawn first, train texts from the rest (seeded)",
        licence=SAE_PROBES_LICENCE,
        class_counts=counts,
        origin=origin,
        notes=notes,
        loader=lambda _n, stem=stem, names=names: _file_pools(stem, names),
    )


def _sp_scr(
    name: str,
    target: Attribute,
    spurious: Attribute,
    description: str,
    counts: dict[str, int],
    origin: str,
    notes: str = "",
    pooling: str = "mean",
) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="scr",
        source="sae-probes",
        dataset=f"cleaned_data/{target.stem} x cleaned_data/{spurious.stem}",
        description=description,
        labels=(
            f"{target.name}: {target.positive_name} ({target.stem} target {target.positive!r}) "
            f"vs {target.negative_name} ({target.negative!r}); {spurious.name}: "
            f"{spurious.positive_name} ({spurious.stem} {spurious.positive!r}) vs "
            f"{spurious.negative_name} ({spurious.negative!r})"
        ),
        split="texts in both files, joined on the exact prompt: test drawn first per quadrant",
        licence=SAE_PROBES_LICENCE,
        class_counts=counts,
        origin=origin,
        notes=notes,
        pooling=pooling,
        loader=lambda _n, t=target, s=spurious: _pair_pools(t, s),
    )


def _sp_ood(
    stem: str, description: str, counts: dict[str, int], origin: str, notes: str = ""
) -> TaskSpec:
    return TaskSpec(
        name=stem,
        kind="ood",
        source="sae-probes",
        dataset=f"cleaned_data/{stem} + OOD data/{stem}_OOD",
        description=description,
        labels="target, encoded per file as sorted strings -> 0, 1 (the reference's LabelEncoder)",
        split="train: balanced draw from the first rows of the in-distribution file; test: the "
        "whole OOD file",
        licence=SAE_PROBES_LICENCE,
        class_counts=counts,
        origin=origin,
        notes=notes,
        loader=lambda _n, stem=stem: _ood_rows(stem),
    )


WES = "Gurnee & Tegmark, world-models entity datasets (github.com/wesg52/world-models)"
WIKIDATA = "Gurnee et al. wikidata probing sets (Pile passages mentioning a person)"
PHRASES = "Gurnee et al. compound-phrase sets (Pile contexts); OOD: the phrase in other languages"

REGISTRY_LIST: list[TaskSpec] = [
    # ---- classes, offline
    _sp_classes(
        "news_topic",
        "97_news_class",
        "news article topic (like SAEBench's ag_news)",
        "target: Entertainment, Politics, Sport, Technology",
        {"Entertainment": 1224, "Politics": 1230, "Sport": 1220, "Technology": 1217},
        "Kaggle text-classification-documentation",
    ),
    _sp_classes(
        "tweet_emotion",
        "102_twt_emotion",
        "emotion of a tweet (a sentiment task like SAEBench's amazon sentiment)",
        "target: happiness, sadness, surprise, worry",
        {"happiness": 1133, "sadness": 1106, "surprise": 939, "worry": 1158},
        "Kaggle emotion-detection-from-text",
    ),
    _sp_classes(
        "world_country",
        "17_world_country",
        "country of a world place name (entity knowledge)",
        "target: Australia, India, Italy, United_Kingdom, United_States",
        {"Australia": 886, "India": 894, "Italy": 759, "United_Kingdom": 885, "United_States": 932},
        WES,
    ),
    _sp_classes(
        "sci_category",
        "99_sci_cat",
        "science of a question (physics, chemistry, biology)",
        "target: Biology, Chemistry, Physics",
        {"Biology": 924, "Chemistry": 933, "Physics": 784},
        "Kaggle physics-vs-chemistry-vs-biology",
    ),
    _sp_classes(
        "glue_mnli",
        "88_glue_mnli",
        "MNLI premise/hypothesis relation",
        "target: contradiction, entailment, neutral",
        {"contradiction": 1651, "entailment": 1660, "neutral": 1662},
        "GLUE MNLI",
    ),
    _sp_classes(
        "it_ticket",
        "103_it_tick",
        "IT service ticket category",
        "target: 7 ticket categories",
        {
            "Access": 680,
            "Administrative rights": 595,
            "HR Support": 700,
            "Hardware": 692,
            "Internal Project": 605,
            "Purchase": 611,
            "Storage": 630,
        },
        "Kaggle it-service-ticket-classification-dataset",
    ),
    TaskSpec(
        name="code_language",
        kind="classes",
        source="sae-probes",
        dataset="cleaned_data/158_code_C, 159_code_Python, 160_code_HTML (positives)",
        description="programming language of a code file (like SAEBench's github-code)",
        labels="C, Python, HTML: the target-1 rows of each file",
        split="test texts drawn first, train texts from the rest (seeded)",
        licence=SAE_PROBES_LICENCE,
        class_counts={"C": 2000, "Python": 2000, "HTML": 1999},
        origin="SAEBench's github-code samples (codeparrot/github-code)",
        loader=lambda _n: _positives_pools(
            {"C": "158_code_C", "Python": "159_code_Python", "HTML": "160_code_HTML"}
        ),
    ),
    _sp_classes(
        "movie_sentiment",
        "113_movie_sent",
        "sentiment of a movie review snippet (like SAEBench's amazon sentiment)",
        "target: 0 (negative), 1 (positive)",
        {"negative": 1904, "positive": 1912},
        "Rotten Tomatoes (cornell-movie-review-data)",
        names={"0": "negative", "1": "positive"},
    ),
    _sp_classes(
        "amazon_5star",
        "157_amazon_5star",
        "is an Amazon review 5-star (vs 1-star)",
        "target: 0 (1 star), 1 (5 stars)",
        {"1-star": 999, "5-star": 1000},
        "SAEBench's amazon_reviews_mcauley_1and5 samples",
        names={"0": "1-star", "1": "5-star"},
    ),
    # ---- scr, offline
    _sp_scr(
        "hist_fig_politician_gender",
        Attribute(
            "7_hist_fig_ispolitician", "politician", "0", "1", "non-politician", "politician"
        ),
        Attribute("5_hist_fig_ismale", "gender", "1", "0", "male", "female"),
        "historical figure names: politician or not, spuriously correlated with gender",
        {
            "politician & female": 142,
            "politician & male": 123,
            "non-politician & female": 123,
            "non-politician & male": 182,
        },
        WES,
        notes="570 names carry both labels (573 shared, 3 with conflicting duplicates); the "
        "biased diagonal is (non-politician & male, politician & female), the larger "
        "quadrants: q_train + q_test <= 71. SmolLM2-135M layer 15 does not decode "
        "'politician' from a name (5-fold accuracy 0.53 vs base rate 0.54), so its SCR is 0 "
        "there: use it with larger models",
    ),
    _sp_scr(
        "hist_fig_american_gender",
        Attribute("6_hist_fig_isamerican", "nationality", "1", "0", "American", "other"),
        Attribute("5_hist_fig_ismale", "gender", "0", "1", "female", "male"),
        "historical figure names: American or not, spuriously correlated with gender",
        {
            "other & male": 180,
            "other & female": 120,
            "American & male": 53,
            "American & female": 68,
        },
        WES,
        notes="421 names carry both labels; biased diagonal (American & female, other & "
        "male): q_train + q_test <= 34. SmolLM2-135M layer 15 decodes both attributes from "
        "mean-pooled names (5-fold accuracy 0.85 nationality vs base rate 0.71, gender 0.77 "
        "vs 0.55)",
    ),
    _sp_scr(
        "wikidata_alive_gender",
        Attribute("57_wikidatais_alive", "alive", "False", "True", "deceased", "alive"),
        Attribute("56_wikidatasex_or_gender", "gender", "male", "female", "male", "female"),
        "Pile passages about a person: alive or not, spuriously correlated with gender",
        {
            "alive & female": 282,
            "alive & male": 228,
            "deceased & female": 95,
            "deceased & male": 479,
        },
        WIKIDATA,
        notes="1,084 passages carry both labels; biased diagonal (deceased & male, alive & "
        "female): q_train + q_test <= 95. Probed at the last token: the passages end with the "
        "person's name, where Kantamneni et al. probe them",
        pooling="last",
    ),
    _sp_scr(
        "wikidata_politician_gender",
        Attribute(
            "62_wikidata_occupation_ispolitician", "politician", "1", "0", "politician", "other"
        ),
        Attribute("56_wikidatasex_or_gender", "gender", "male", "female", "male", "female"),
        "Pile passages about a person: politician or not, spuriously correlated with gender",
        {
            "other & female": 83,
            "other & male": 84,
            "politician & female": 36,
            "politician & male": 142,
        },
        WIKIDATA,
        notes="345 passages carry both labels; only 36 female politicians: q_train + q_test "
        "<= 36. Probed at the last token (the passages end with the person's name)",
        pooling="last",
    ),
    # ---- ood, offline (the 8 datasets of the paper's Figure 1)
    _sp_ood(
        "5_hist_fig_ismale",
        "is a historical figure male; OOD: fictional characters",
        {"in-distribution 0": 2500, "in-distribution 1": 2500, "OOD 0": 143, "OOD 1": 156},
        WES,
    ),
    _sp_ood(
        "6_hist_fig_isamerican",
        "is a historical figure American; OOD: names with a random leading letter",
        {"in-distribution 0": 2500, "in-distribution 1": 2500, "OOD 0": 150, "OOD 1": 150},
        WES,
    ),
    _sp_ood(
        "7_hist_fig_ispolitician",
        "is a historical figure a politician; OOD: surname-first names",
        {"in-distribution 0": 2500, "in-distribution 1": 2500, "OOD 0": 156, "OOD 1": 144},
        WES,
    ),
    _sp_ood(
        "66_living-room",
        "does the context contain 'living room'; OOD: other languages",
        {"in-distribution 0": 1559, "in-distribution 1": 1559, "OOD 0": 150, "OOD 1": 150},
        PHRASES,
        notes="labels: bigram -> 0, not_bigram -> 1 (sorted strings)",
    ),
    _sp_ood(
        "67_social-security",
        "does the context contain 'social security'; OOD: other languages",
        {"in-distribution 0": 1600, "in-distribution 1": 1600, "OOD 0": 150, "OOD 1": 150},
        PHRASES,
        notes="labels: bigram -> 0, not_bigram -> 1 (sorted strings)",
    ),
    _sp_ood(
        "73_control-group",
        "does the context contain 'control group'; OOD: other languages",
        {"in-distribution 0": 1600, "in-distribution 1": 1600, "OOD 0": 150, "OOD 1": 150},
        PHRASES,
        notes="labels: bigram -> 0, not_bigram -> 1 (sorted strings)",
    ),
    _sp_ood(
        "87_glue_cola",
        "is a sentence grammatical (CoLA); OOD: another source of sentences",
        {"in-distribution 0": 2500, "in-distribution 1": 2500, "OOD 0": 150, "OOD 1": 150},
        "GLUE CoLA",
    ),
    _sp_ood(
        "90_glue_qnli",
        "QNLI entailment; OOD: single sentences",
        {"in-distribution 0": 2500, "in-distribution 1": 2500, "OOD 0": 150, "OOD 1": 150},
        "GLUE QNLI",
        notes="the OOD file's targets are '1' and 'not_entailment'; each file is encoded "
        "separately as the reference does ('1' -> 0, 'not_entailment' -> 1 in the OOD file)",
    ),
]


# ---------------------------------------------------------------------------- hub (SAEBench)
def _hub_classes(
    name: str,
    dataset: str,
    description: str,
    labels: str,
    split: str,
    licence: str,
    loader: Callable[[int], ClassPools],
    notes: str = "",
) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="classes",
        source="hub",
        dataset=dataset,
        description=description,
        labels=labels,
        split=split,
        licence=licence,
        origin=dataset,
        notes=notes,
        loader=loader,
    )


BIAS_SETS = {1: [0, 1, 2, 6, 9], 2: [11, 13, 14, 18, 19], 3: [20, 21, 22, 25, 26]}
"""SAEBench's chosen bias_in_bios professions per class set (dataset_info.py)."""
BIB_SPLIT = "Hub train / test splits; each profession half male, half female"
NOT_VERIFIED = "not stated here: see the Hub dataset card"

for _set, _codes in BIAS_SETS.items():
    REGISTRY_LIST.append(
        _hub_classes(
            f"bias_in_bios_set{_set}",
            hub.BIAS_IN_BIOS,
            "profession from a biography",
            "profession: " + ", ".join(hub.PROFESSIONS[c] for c in _codes),
            BIB_SPLIT,
            "MIT (dataset card)",
            lambda _n, codes=_codes: hub.bias_in_bios_pools(codes),
        )
    )
REGISTRY_LIST += [
    _hub_classes(
        "amazon_category",
        hub.AMAZON,
        "product category of an Amazon review",
        "category: " + ", ".join(hub.AMAZON_CATEGORIES[c] for c in (1, 2, 3, 5, 6)),
        "Hub train / test splits; each category half 1-star, half 5-star",
        NOT_VERIFIED,
        lambda _n: hub.amazon_category_pools([1, 2, 3, 5, 6]),
    ),
    _hub_classes(
        "amazon_sentiment",
        hub.AMAZON,
        "rating of an Amazon review",
        "rating: 1.0, 5.0",
        "Hub train / test splits",
        NOT_VERIFIED,
        lambda _n: hub.amazon_sentiment_pools(),
    ),
    _hub_classes(
        "github_code",
        hub.GITHUB_CODE,
        "programming language of a code file",
        "language: C, Python, HTML, Java, PHP",
        "streamed train split, test drawn first (seeded); the first 150 characters skipped",
        "per-file licences of the source repositories (dataset card)",
        lambda n: hub.github_code_pools(["C", "Python", "HTML", "Java", "PHP"], n),
        notes="a loading-script dataset: needs a `datasets` version that runs scripts (< 4)",
    ),
    _hub_classes(
        "ag_news",
        hub.AG_NEWS,
        "news topic",
        "label: World, Sports, Business, Sci/Tech",
        "Hub train / test splits",
        NOT_VERIFIED,
        lambda _n: hub.ag_news_pools(),
    ),
    _hub_classes(
        "europarl",
        hub.EUROPARL,
        "language of a European Parliament sentence",
        "language: en, fr, de, es, nl",
        "streamed train split of SAEBench's language pairs, test drawn first (seeded)",
        NOT_VERIFIED,
        lambda n: hub.europarl_pools(["en", "fr", "de", "es", "nl"], n),
    ),
]

SCR_PAIRS = {
    "bias_in_bios": [
        ("professor", "nurse"),
        ("architect", "journalist"),
        ("surgeon", "psychologist"),
        ("attorney", "teacher"),
    ],
    "amazon": [
        ("Books", "CDs_and_Vinyl"),
        ("Software", "Electronics"),
        ("Pet_Supplies", "Office_Products"),
        ("Industrial_and_Scientific", "Toys_and_Games"),
    ],
}
"""SAEBench's SCR class pairs (eval_config.column1_vals_lookup)."""

for _pos, _neg in SCR_PAIRS["bias_in_bios"]:
    _p, _n = hub.PROFESSIONS.index(_pos), hub.PROFESSIONS.index(_neg)
    REGISTRY_LIST.append(
        TaskSpec(
            name=f"bias_in_bios_{_pos}_{_neg}",
            kind="scr",
            source="hub",
            dataset=hub.BIAS_IN_BIOS,
            description=f"{_pos} vs {_neg}, spuriously correlated with gender",
            labels=f"profession {_p} vs {_n}; gender 0 (male) vs 1 (female)",
            split="Hub train / test splits",
            licence="MIT (dataset card)",
            origin=hub.BIAS_IN_BIOS,
            loader=lambda _x, p=_p, n=_n, pos=_pos, neg=_neg: hub.scr_pools(
                hub.BIAS_IN_BIOS,
                "hard_text",
                "profession",
                (str(p), str(n)),
                "gender",
                ("0", "1"),
                ((neg, pos), ("female", "male")),
                ("profession", "gender"),
            ),
        )
    )
for _pos, _neg in SCR_PAIRS["amazon"]:
    _p, _n = hub.AMAZON_CATEGORIES.index(_pos), hub.AMAZON_CATEGORIES.index(_neg)
    REGISTRY_LIST.append(
        TaskSpec(
            name=f"amazon_{_pos}_{_neg}".lower(),
            kind="scr",
            source="hub",
            dataset=hub.AMAZON,
            description=f"{_pos} vs {_neg}, spuriously correlated with the rating",
            labels=f"category {_p} vs {_n}; rating 1.0 vs 5.0",
            split="Hub train / test splits",
            licence=NOT_VERIFIED,
            origin=hub.AMAZON,
            loader=lambda _x, p=_p, n=_n, pos=_pos, neg=_neg: hub.scr_pools(
                hub.AMAZON,
                "text",
                "category",
                (str(p), str(n)),
                "rating",
                ("1.0", "5.0"),
                ((neg, pos), ("5-star", "1-star")),
                ("category", "rating"),
            ),
        )
    )

REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in REGISTRY_LIST}


def _generic_spec(name: str) -> TaskSpec:
    """``sae_probes:<stem>``: any binary or multi-class sae-probes file as a classes task."""
    stem = name[len(GENERIC_PREFIX) :]
    return TaskSpec(
        name=name,
        kind="classes",
        source="sae-probes",
        dataset=f"cleaned_data/{stem}",
        description=f"sae-probes dataset {stem}",
        labels="target (sorted strings)",
        split="one file: test texts drawn first, train texts from the rest (seeded)",
        licence=SAE_PROBES_LICENCE,
        loader=lambda _n: _file_pools(stem),
    )


def get_spec(name: str, kind: str | None = None) -> TaskSpec:
    """The registered task ``name`` (ConfigError naming the choices when unknown or of
    another kind)."""
    spec = _generic_spec(name) if name.startswith(GENERIC_PREFIX) else REGISTRY.get(name)
    if spec is None:
        choices = [s.name for s in REGISTRY_LIST if kind is None or s.kind == kind]
        raise ConfigError(
            f"unknown probing task {name!r}: choose from {', '.join(choices)}"
            + (f" or {GENERIC_PREFIX}<file stem>" if kind in (None, "classes") else "")
            + " (`masksae tasks list` shows them all)"
        )
    if kind is not None and spec.kind != kind:
        raise ConfigError(
            f"task {name!r} is a {spec.kind} task, not a {kind} task: choose from "
            + ", ".join(s.name for s in REGISTRY_LIST if s.kind == kind)
        )
    return spec


@functools.lru_cache(maxsize=64)
def _pools(name: str, per_class_hint: int) -> Any:
    spec = get_spec(name)
    assert spec.loader is not None
    return spec.loader(per_class_hint)


def _info(spec: TaskSpec, **sizes: Any) -> dict[str, Any]:
    return {
        "task": spec.name,
        "kind": spec.kind,
        "source": spec.source,
        "dataset": spec.dataset,
        **sizes,
    }


def load_classes(name: str, n_train: int, n_test: int, seed: int) -> TaskData:
    """A classes task: ``n_train`` / ``n_test`` texts per class (seeded)."""
    spec = get_spec(name, "classes")
    pools: ClassPools = _pools(name, n_train + n_test)
    return sample_classes(
        name,
        pools,
        n_train,
        n_test,
        seed,
        _info(
            spec,
            n_train_per_class=n_train,
            n_test_per_class=n_test,
            seed=seed,
            pool_counts=pools.counts(),
        ),
    )


def scr_capacity(quadrants: dict[tuple[int, int], list[str]]) -> int:
    """The largest q a set of quadrants supports: 2q texts in each agreeing quadrant, q in
    the others."""
    return min(len(t) // (2 if a == b else 1) for (a, b), t in quadrants.items())


def fit_quadrant_sizes(
    name: str, pools: QuadrantPools, q_train: int, q_test: int
) -> tuple[int, int]:
    """(q_train, q_test) shrunk, keeping their ratio, to what the task holds (logged): the
    offline pairs hold at most 34-95 texts per quadrant, far below SAEBench's 1000 + 250."""
    if pools.test is not None:
        cap_train, cap_test = scr_capacity(pools.train), scr_capacity(pools.test)
        fitted = (min(q_train, cap_train), min(q_test, cap_test))
    else:
        cap = scr_capacity(pools.train)
        if q_train + q_test <= cap:
            return q_train, q_test
        test = max(1, round(q_test * cap / (q_train + q_test)))
        fitted = (cap - test, test)
    if fitted != (q_train, q_test):
        log.warning(
            "SCR task %s holds at most %s texts per quadrant: using q_train=%d, q_test=%d "
            "instead of %d, %d",
            name,
            fitted[0] + fitted[1] if pools.test is None else fitted,
            fitted[0],
            fitted[1],
            q_train,
            q_test,
        )
    if min(fitted) < 1:
        raise ConfigError(f"SCR task {name} has an empty quadrant: choose another task")
    return fitted


def load_scr(name: str, q_train: int, q_test: int, seed: int) -> TaskData:
    """An SCR task: ``q`` texts per quadrant and split (2q in the agreeing quadrants), shrunk
    to what the task holds (:func:`fit_quadrant_sizes`)."""
    spec = get_spec(name, "scr")
    pools: QuadrantPools = _pools(name, 2 * (q_train + q_test))
    q_train, q_test = fit_quadrant_sizes(name, pools, q_train, q_test)
    data = sample_quadrants(
        name,
        pools,
        q_train,
        q_test,
        seed,
        _info(spec, q_train=q_train, q_test=q_test, seed=seed, pool_counts=pools.counts()),
    )
    data.info["attributes"] = list(pools.attribute_names)
    data.info["values"] = [list(v) for v in pools.value_names]
    return data


def load_ood(name: str, n_train: int, pool: int, seed: int) -> TaskData:
    """An OOD task: ``n_train`` balanced texts from the first ``pool`` in-distribution rows,
    and the whole OOD file."""
    spec = get_spec(name, "ood")
    rows: OodRows = _pools(name, 0)
    if pool < n_train:
        raise ConfigError(f"OOD pool {pool} is smaller than n_train {n_train}: raise the pool")
    return sample_ood(
        name,
        rows.train[:pool],
        rows.ood,
        n_train,
        seed,
        _info(spec, n_train=n_train, pool=pool, seed=seed, n_ood=len(rows.ood)),
        rows.label_names,
    )


def pool_counts(name: str) -> dict[str, int]:
    """Texts per class (quadrant; OOD: per label in-distribution and OOD) as loaded."""
    spec = get_spec(name)
    pools = _pools(name, 0)
    if spec.kind == "ood":
        out: dict[str, int] = {}
        for prefix, rows in (("in-distribution", pools.train), ("OOD", pools.ood)):
            for y in (0, 1):
                out[f"{prefix} {y}"] = sum(1 for _, lab in rows if lab == y)
        return out
    return pools.counts()


def availability(spec: TaskSpec) -> tuple[bool, str]:
    """(available, reason): packaged tasks need the sae-probes wheel; Hub tasks need
    ``datasets`` and the Hub (or a local copy in the datasets cache)."""
    if spec.source == "sae-probes":
        if sae_probes.data_dir() is None:
            return False, "sae-probes not installed: " + sae_probes.INSTALL_HINT
        version = sae_probes.installed_version()
        note = "" if version in (None, sae_probes.VERSION) else f" (version {version})"
        return True, "packaged" + note
    return hub_availability(spec.dataset)


def hub_availability(hub_id: str) -> tuple[bool, str]:
    """Whether ``datasets`` is installed and the Hub is allowed (offline mode set?), and
    whether a local copy of ``hub_id`` is in the datasets cache."""
    import importlib.util
    import os

    if importlib.util.find_spec("datasets") is None:
        return False, "needs `datasets`: pip install 'masksae[hub]'"
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    cached = _hub_cached(hub_id)
    if offline:
        if cached:
            return True, "offline mode, local copy in the datasets cache"
        return False, "offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and no local copy"
    return True, "from the Hub" + (
        " (local copy cached)" if cached else " (downloaded on first use)"
    )


def _hub_cached(hub_id: str) -> bool:
    import os
    from pathlib import Path

    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots = [Path(os.environ["HF_DATASETS_CACHE"])] if "HF_DATASETS_CACHE" in os.environ else []
    roots += [home / "datasets", home / "hub"]
    slug = hub_id.replace("/", "___")
    hub_slug = "datasets--" + hub_id.replace("/", "--")
    return any((r / slug).exists() or (r / hub_slug).exists() for r in roots)
