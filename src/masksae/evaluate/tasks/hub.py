"""SAEBench's probing datasets, loaded from the Hugging Face Hub with ``datasets``.

Each loader reads the dataset the way SAEBench's ``sae_bench_utils/dataset_utils.py`` and
``evals/scr_and_tpp/dataset_creation.py`` do (same Hub ids, columns, splits, chosen classes and
filters) and returns pools for :mod:`masksae.evaluate.tasks.sampling`. Without the Hub (or
without ``datasets``) they raise :class:`TaskUnavailableError` with the offline hint: the
sae-probes tasks cover every metric offline.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from masksae.evaluate.tasks.data import TaskUnavailableError
from masksae.evaluate.tasks.sampling import ClassPools, QuadrantPools, dedupe_labelled

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "offline? the sae-probes tasks run every probing metric without the Hub "
    "(--probing-preset demo or offline; `masksae tasks list` shows what is available)"
)

BIAS_IN_BIOS = "LabHC/bias_in_bios"
AMAZON = "canrager/amazon_reviews_mcauley_1and5"
AG_NEWS = "fancyzhx/ag_news"
GITHUB_CODE = "codeparrot/github-code"
EUROPARL = "Helsinki-NLP/europarl"

PROFESSIONS = (
    "accountant architect attorney chiropractor comedian composer dentist dietitian dj "
    "filmmaker interior_designer journalist model nurse painter paralegal pastor "
    "personal_trainer photographer physician poet professor psychologist rapper "
    "software_engineer surgeon teacher yoga_teacher"
).split()
"""bias_in_bios ``profession`` codes 0..27 (the dataset card's order)."""
GENDERS = ("male", "female")
"""bias_in_bios ``gender`` codes 0, 1."""
AMAZON_CATEGORIES = (
    "All_Beauty Toys_and_Games Cell_Phones_and_Accessories Industrial_and_Scientific "
    "Gift_Cards Musical_Instruments Electronics Handmade_Products Arts_Crafts_and_Sewing "
    "Baby_Products Health_and_Household Office_Products Digital_Music "
    "Grocery_and_Gourmet_Food Sports_and_Outdoors Home_and_Kitchen Subscription_Boxes "
    "Tools_and_Home_Improvement Pet_Supplies Video_Games Kindle_Store "
    "Clothing_Shoes_and_Jewelry Patio_Lawn_and_Garden Unknown Books Automotive CDs_and_Vinyl "
    "Beauty_and_Personal_Care Amazon_Fashion Magazine_Subscriptions Software "
    "Health_and_Personal_Care Appliances Movies_and_TV"
).split()
"""amazon_reviews_mcauley_1and5 ``category`` codes 0..33 (SAEBench's dataset_info.py)."""
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
"""The language pair SAEBench streams each europarl language from."""
GITHUB_SKIP_CHARS = 150
"""github-code: characters dropped from the start of each file (licence headers; SAEBench,
after "Neurons in a Haystack": 50 tokens x 3 characters)."""
GITHUB_MIN_CHARS = 384
"""github-code: files must be longer than this after the skip (128 tokens x 3 characters)."""


def load_dataset(hub_id: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with the failure turned into TaskUnavailableError."""
    try:
        import datasets
    except ImportError:
        raise TaskUnavailableError(
            f"task data {hub_id!r} comes from the Hugging Face Hub, which needs the `datasets` "
            f"package: pip install 'masksae[hub]' ({OFFLINE_HINT})"
        ) from None
    try:
        return datasets.load_dataset(hub_id, *args, **kwargs)
    except Exception as exc:  # offline, not found, gated, script datasets on datasets>=4 ...
        raise TaskUnavailableError(
            f"cannot load Hugging Face dataset {hub_id!r} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); {OFFLINE_HINT}"
        ) from exc


def _rows(dataset: Iterable[Any], hub_id: str) -> Iterator[dict]:
    """Records of a loaded dataset, with read failures (a dropped stream) as user errors."""
    it = iter(dataset)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise TaskUnavailableError(
                f"reading Hugging Face dataset {hub_id!r} failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}); {OFFLINE_HINT}"
            ) from exc
        yield row


def _grouped(records: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str], list[str]]:
    """(text, class, stratum) records -> {(class, stratum): texts}, de-duplicated."""
    pairs = dedupe_labelled((text, f"{c}\0{s}") for text, c, s in records)
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for text, key in pairs:
        c, s = key.split("\0")
        out[(c, s)].append(text)
    return out


def _without(test: dict, train: dict) -> dict:
    """``test`` groups minus any text that is also in the train split."""
    seen = {t for texts in train.values() for t in texts}
    return {k: [t for t in v if t not in seen] for k, v in test.items()}


def two_column_split(
    hub_id: str, split: str, text_col: str, col1: str, col2: str
) -> dict[tuple[str, str], list[str]]:
    """bias_in_bios / amazon: {(column1 value, column2 value): texts} of one split."""
    records = (
        (row[text_col], str(row[col1]), str(row[col2]))
        for row in _rows(load_dataset(hub_id, split=split), hub_id)
    )
    return _grouped(records)


def _two_column(hub_id: str, text_col: str, col1: str, col2: str) -> tuple[dict, dict]:
    train = two_column_split(hub_id, "train", text_col, col1, col2)
    test = _without(two_column_split(hub_id, "test", text_col, col1, col2), train)
    return train, test


def stratified_pools(
    hub_id: str,
    text_col: str,
    col1: str,
    col2: str,
    classes: list[str],
    strata: list[str],
    class_names: list[str],
) -> ClassPools:
    """Classes of column 1, each balanced over the column-2 values ``strata`` (SAEBench's
    get_balanced_dataset: bias_in_bios professions by gender, amazon categories by rating)."""
    train, test = _two_column(hub_id, text_col, col1, col2)
    return ClassPools(
        class_names,
        {
            n: [train.get((c, s), []) for s in strata]
            for c, n in zip(classes, class_names, strict=True)
        },
        {
            n: [test.get((c, s), []) for s in strata]
            for c, n in zip(classes, class_names, strict=True)
        },
    )


def bias_in_bios_pools(profession_codes: list[int]) -> ClassPools:
    """bias_in_bios professions (``hard_text``), each sampled equally over both genders."""
    return stratified_pools(
        BIAS_IN_BIOS,
        "hard_text",
        "profession",
        "gender",
        [str(c) for c in profession_codes],
        ["0", "1"],
        [PROFESSIONS[c] for c in profession_codes],
    )


def amazon_category_pools(category_codes: list[int]) -> ClassPools:
    """Amazon review categories, each sampled equally over the 1- and 5-star ratings."""
    return stratified_pools(
        AMAZON,
        "text",
        "category",
        "rating",
        [str(c) for c in category_codes],
        ["1.0", "5.0"],
        [AMAZON_CATEGORIES[c] for c in category_codes],
    )


def amazon_sentiment_pools() -> ClassPools:
    """Amazon reviews by rating (1.0 vs 5.0), all categories together."""
    train, test = _two_column(AMAZON, "text", "rating", "category")
    names = ["1.0", "5.0"]

    def merge(groups: dict, rating: str) -> list[list[str]]:
        return [[t for (r, _), texts in sorted(groups.items()) if r == rating for t in texts]]

    return ClassPools(
        names, {r: merge(train, r) for r in names}, {r: merge(test, r) for r in names}
    )


def ag_news_pools() -> ClassPools:
    """AG News topics (``label`` 0-3) from its train and test splits."""

    def split(name: str) -> dict:
        rows = _rows(load_dataset(AG_NEWS, split=name), AG_NEWS)
        return _grouped((row["text"], str(row["label"]), "") for row in rows)

    train = split("train")
    test = _without(split("test"), train)
    names = list(AG_NEWS_LABELS)
    return ClassPools(
        names,
        {n: [train.get((str(i), ""), [])] for i, n in enumerate(names)},
        {n: [test.get((str(i), ""), [])] for i, n in enumerate(names)},
    )


def github_code_pools(languages: list[str], per_class: int) -> ClassPools:
    """github-code files by language (streamed until every language has ``per_class`` + 1
    usable files), licence header skipped: SAEBench's get_github_code_dataset."""
    stream = load_dataset(
        GITHUB_CODE, streaming=True, split="train", trust_remote_code=True, languages=languages
    )
    found: dict[str, list[str]] = {lang: [] for lang in languages}
    for row in _rows(stream, GITHUB_CODE):
        lang, code = row.get("language"), row.get("code") or ""
        if lang in found and len(code) > GITHUB_MIN_CHARS + GITHUB_SKIP_CHARS:
            found[lang].append(code[GITHUB_SKIP_CHARS:])
        if all(len(v) > per_class for v in found.values()):
            break
    pairs = dedupe_labelled((t, lang) for lang, texts in found.items() for t in texts)
    return ClassPools(languages, {lang: [[t for t, y in pairs if y == lang]] for lang in languages})


def europarl_pools(languages: list[str], per_class: int) -> ClassPools:
    """Europarl sentences by language, each streamed from SAEBench's language pair."""
    found: dict[str, list[str]] = {}
    for lang in languages:
        pair = EUROPARL_PAIRS.get(lang)
        if pair is None:
            raise TaskUnavailableError(
                f"europarl language {lang!r} has no language pair here; choose from "
                f"{sorted(EUROPARL_PAIRS)}"
            )
        texts: list[str] = []
        for row in _rows(load_dataset(EUROPARL, pair, streaming=True, split="train"), EUROPARL):
            texts.append(row["translation"][lang])
            if len(texts) > per_class:
                break
        found[lang] = texts
    pairs = dedupe_labelled((t, lang) for lang, texts in found.items() for t in texts)
    return ClassPools(languages, {lang: [[t for t, y in pairs if y == lang]] for lang in languages})


def scr_pools(
    hub_id: str,
    text_col: str,
    col1: str,
    col1_values: tuple[str, str],
    col2: str,
    col2_values: tuple[str, str],
    names: tuple[tuple[str, str], tuple[str, str]],
    attribute_names: tuple[str, str],
) -> QuadrantPools:
    """SCR quadrants of a two-column Hub dataset. ``colX_values`` = (positive, negative) codes
    as SAEBench orders them (e.g. professor/nurse, male/female); quadrant (a, b) has a = 1 for
    column 1's positive value and b = 1 for column 2's."""
    train, test = _two_column(hub_id, text_col, col1, col2)

    def quadrants(groups: dict) -> dict[tuple[int, int], list[str]]:
        return {
            (a, b): groups.get((col1_values[1 - a], col2_values[1 - b]), [])
            for a in (0, 1)
            for b in (0, 1)
        }

    return QuadrantPools(attribute_names, names, quadrants(train), quadrants(test))
