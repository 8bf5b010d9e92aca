"""Settings of the probing metrics (sparse probing, SCR, TPP, OOD) and their presets.

Field defaults are the references' protocol at full size (SAEBench's ``eval_config.py`` files
and Kantamneni et al.'s OOD experiment), which needs the Hugging Face Hub for SAEBench's
datasets: :func:`probing_preset` ("paper"). The other presets run offline on the sae-probes
data: "demo" (CPU-sized, what ``make demo`` uses), "offline" (the sae-probes tasks at sizes
close to the references') and "tiny" (a smoke test: the numbers mean nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from masksae.errors import ConfigError
from masksae.evaluate.probing.probes import REFERENCE_CS

SAEBENCH_SPARSE_TASKS = (
    "bias_in_bios_set1",
    "bias_in_bios_set2",
    "bias_in_bios_set3",
    "amazon_category",
    "amazon_sentiment",
    "github_code",
    "ag_news",
    "europarl",
)
SAEBENCH_SCR_TASKS = (
    "bias_in_bios_professor_nurse",
    "bias_in_bios_architect_journalist",
    "bias_in_bios_surgeon_psychologist",
    "bias_in_bios_attorney_teacher",
    "amazon_books_cds_and_vinyl",
    "amazon_software_electronics",
    "amazon_pet_supplies_office_products",
    "amazon_industrial_and_scientific_toys_and_games",
)
SAEBENCH_TPP_TASKS = ("bias_in_bios_set1", "amazon_category")
OOD_TASKS = (
    "5_hist_fig_ismale",
    "6_hist_fig_isamerican",
    "7_hist_fig_ispolitician",
    "66_living-room",
    "67_social-security",
    "73_control-group",
    "87_glue_cola",
    "90_glue_qnli",
)
"""The 8 OOD datasets of Kantamneni et al. (the masking paper's Figure 1)."""
SAEBENCH_N_VALUES = (2, 5, 10, 20, 50, 100, 500)


def _positive(section: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{section} {name}={value}; expected >= 1")


@dataclass
class SparseProbingConfig:
    """SAEBench sparse probing (``evals/sparse_probing``)."""

    tasks: tuple[str, ...] = SAEBENCH_SPARSE_TASKS
    """Classes tasks (``masksae tasks list``); accuracy is averaged over classes, then tasks."""
    train_per_class: int = 2000
    """Training texts per class (SAEBench: 4000-text probe sets, half positives)."""
    test_per_class: int = 500
    """Test texts per class (SAEBench: 1000-text probe sets)."""
    k_values: tuple[int, ...] = (1, 2, 5)
    """Sizes of the top-k latent (and top-k LLM-dimension) probes."""
    headline_k: int = 1
    """The k whose SAE accuracy the report's table shows."""
    full_probes: bool = True
    """Also fit probes on all SAE latents and on all LLM dimensions (reference lines)."""
    context_length: int = 128
    """Tokens per text, BOS included (the start is kept)."""
    probe_C: float = 1.0
    """Inverse L2 strength of every probe (scikit-learn's default, as SAEBench)."""
    probe_max_iter: int = 1000
    """lbfgs iterations per probe (SAEBench: 1000)."""
    seed: int = 42
    """Seed of the text sampling and of the negatives drawn for each one-vs-rest probe."""

    def validate(self) -> None:
        _positive(
            "sparse_probing",
            train_per_class=self.train_per_class,
            test_per_class=self.test_per_class,
            context_length=self.context_length - 1,
            probe_max_iter=self.probe_max_iter,
        )
        if not self.k_values or min(self.k_values) < 1:
            raise ConfigError(f"sparse_probing k_values={self.k_values}; expected positive ints")
        if self.headline_k not in self.k_values:
            raise ConfigError(
                f"sparse_probing headline_k={self.headline_k} is not among k_values "
                f"{self.k_values}: add it or pick one of them"
            )


@dataclass
class ScrConfig:
    """SAEBench spurious correlation removal (``evals/scr_and_tpp`` with perform_scr)."""

    tasks: tuple[str, ...] = SAEBENCH_SCR_TASKS
    """SCR tasks (two attributes on the same texts); the score is averaged over them."""
    train_per_quadrant: int = 1000
    """q: training texts per quadrant (SAEBench: 4000 // 4); the biased set takes 2q from
    each of the two agreeing quadrants."""
    test_per_quadrant: int = 250
    """Test texts per quadrant (SAEBench: 1000 // 4)."""
    n_values: tuple[int, ...] = SAEBENCH_N_VALUES
    """Numbers of latents ablated."""
    headline_n: int = 20
    """The N whose score the report's table shows."""
    context_length: int = 128
    """Tokens per text, BOS included."""
    probe_C: float = 1.0
    """Inverse L2 strength of the LLM-activation probes."""
    probe_max_iter: int = 1000
    """lbfgs iterations per probe."""
    min_denominator: float = 0.001
    """SAEBench's guard: when A_clean - A_orig is below this, the score is 0."""
    seed: int = 42
    """Seed of the text sampling."""

    def validate(self) -> None:
        _positive(
            "scr",
            train_per_quadrant=self.train_per_quadrant,
            test_per_quadrant=self.test_per_quadrant,
            context_length=self.context_length - 1,
        )
        _check_n("scr", self.n_values, self.headline_n)


@dataclass
class TppConfig:
    """SAEBench targeted probe perturbation (``evals/scr_and_tpp`` without perform_scr)."""

    tasks: tuple[str, ...] = SAEBENCH_TPP_TASKS
    """Classes tasks with at least 3 classes; the score is averaged over classes, then tasks."""
    train_per_class: int = 2000
    """Training texts per class (equal to sparse probing's, so the two share activations)."""
    test_per_class: int = 500
    """Test texts per class."""
    n_values: tuple[int, ...] = SAEBENCH_N_VALUES
    """Numbers of latents ablated."""
    headline_n: int = 20
    """The N whose score the report's table shows."""
    context_length: int = 128
    """Tokens per text, BOS included."""
    probe_C: float = 1.0
    """Inverse L2 strength of the LLM-activation probes."""
    probe_max_iter: int = 1000
    """lbfgs iterations per probe."""
    seed: int = 42
    """Seed of the text sampling and of each one-vs-rest probe's negatives."""

    def validate(self) -> None:
        _positive(
            "tpp",
            train_per_class=self.train_per_class,
            test_per_class=self.test_per_class,
            context_length=self.context_length - 1,
        )
        _check_n("tpp", self.n_values, self.headline_n)


@dataclass
class OodConfig:
    """Kantamneni et al.'s OOD probing (the masking paper's Figure 1)."""

    tasks: tuple[str, ...] = OOD_TASKS
    """OOD tasks; the figure shows each and their mean."""
    n_train: int = 1024
    """Balanced in-distribution training texts (half per class)."""
    pool: int = 1500
    """The training texts are drawn from the first this-many rows of the dataset."""
    k: int = 128
    """SAE latents kept for the SAE probe (by |mean difference| on the training set)."""
    latent_ranking: str = "mean_diff"
    """"mean_diff": |mean_pos - mean_neg| of the latents, as their OOD experiment
    (get_xy_OOD_sae); "normalized_mean_diff": of each latent divided by its mean non-zero
    activation, as their in-distribution runs (get_sorted_indices_new)."""
    Cs: tuple[float, ...] = REFERENCE_CS
    """Regularisation grid searched by validation ROC-AUC."""
    context_length: int = 1024
    """Tokens per text, BOS included (the end is kept: the probed token is the last one)."""
    probe_max_iter: int = 1000
    """Solver iterations per fit (saga for the L1 SAE probe, lbfgs for the L2 oracle)."""
    probe_seed: int = 1
    """random_state of the probes and the refit shuffle (find_best_reg's seed)."""
    seed: int = 42
    """Seed of the balanced training draw."""

    def validate(self) -> None:
        _positive(
            "ood",
            n_train=self.n_train - 1,
            pool=self.pool,
            k=self.k,
            context_length=self.context_length - 1,
        )
        if self.latent_ranking not in ("mean_diff", "normalized_mean_diff"):
            raise ConfigError(
                f"ood latent_ranking={self.latent_ranking!r}; expected 'mean_diff' or "
                "'normalized_mean_diff'"
            )
        if not self.Cs:
            raise ConfigError("ood Cs is empty: give at least one regularisation value")


def _check_n(section: str, n_values: tuple[int, ...], headline: int) -> None:
    if not n_values or min(n_values) < 1:
        raise ConfigError(f"{section} n_values={n_values}; expected positive ints")
    if headline not in n_values:
        raise ConfigError(
            f"{section} headline_n={headline} is not among n_values {n_values}: add it"
        )


@dataclass
class ProbingConfig:
    """The four probing metrics and what they share."""

    sparse_probing: SparseProbingConfig = field(default_factory=SparseProbingConfig)
    """Sparse probing settings."""
    scr: ScrConfig = field(default_factory=ScrConfig)
    """SCR settings."""
    tpp: TppConfig = field(default_factory=TppConfig)
    """TPP settings."""
    ood: OodConfig = field(default_factory=OodConfig)
    """OOD probing settings."""
    preset: str = "paper"
    """Name of the preset these settings started from (recorded in results)."""
    prepend_bos: bool = True
    """Prepend the tokenizer's BOS to every text and leave it out of the pooling (SAEBench
    gets BOS from Gemma's tokenizer; doing it for every model keeps the attention-sink
    position out of the features). False: no BOS, and position 0 is left out instead."""
    outlier_norm_factor: float = 10.0
    """Tokens whose activation norm exceeds this factor x the median norm of the task's
    tokens are left out of the pooled features (the harvest's rule, so SAEs only see
    positions like their training data; SmolLM2 has a few at ~100x the median). 0 keeps
    them (SAEBench)."""
    llm_batch_size: int = 32
    """Texts per LLM forward pass."""
    sae_batch_tokens: int = 4096
    """Token activations per SAE encode call."""
    cache_dtype: str = "float16"
    """Dtype of the cached per-token activations ("float16", or "float32"; float16 falls
    back to float32 when a value overflows)."""
    memory_mb: int = 2048
    """Cached activations kept in memory between checkpoints (the rest is re-read from disk)."""

    def validate(self) -> None:
        self.sparse_probing.validate()
        self.scr.validate()
        self.tpp.validate()
        self.ood.validate()
        if self.cache_dtype not in ("float16", "float32"):
            raise ConfigError(
                f"probing cache_dtype={self.cache_dtype!r}; expected 'float16' or 'float32'"
            )
        _positive(
            "probing", llm_batch_size=self.llm_batch_size, sae_batch_tokens=self.sae_batch_tokens
        )
        if not (self.outlier_norm_factor == 0 or self.outlier_norm_factor > 1):
            raise ConfigError(
                f"probing outlier_norm_factor={self.outlier_norm_factor}; expected 0 (keep "
                "every token) or a number > 1 (default 10)"
            )


DEMO_SPARSE_TASKS = ("news_topic", "movie_sentiment", "world_country", "sci_category")
DEMO_SCR_TASKS = ("hist_fig_american_gender", "wikidata_alive_gender")
DEMO_TPP_TASKS = ("news_topic", "world_country")
OFFLINE_SPARSE_TASKS = (
    "news_topic",
    "movie_sentiment",
    "tweet_emotion",
    "world_country",
    "sci_category",
    "glue_mnli",
    "it_ticket",
    "code_language",
    "amazon_5star",
)


def _demo() -> ProbingConfig:
    return ProbingConfig(
        sparse_probing=SparseProbingConfig(
            tasks=DEMO_SPARSE_TASKS, train_per_class=100, test_per_class=50
        ),
        # hist_fig_american_gender holds 34 texts per quadrant: its q shrinks to 24 / 10
        scr=ScrConfig(tasks=DEMO_SCR_TASKS, train_per_quadrant=50, test_per_quadrant=20),
        tpp=TppConfig(tasks=DEMO_TPP_TASKS, train_per_class=100, test_per_class=50),
        ood=OodConfig(n_train=256),
        preset="demo",
    )


def _offline() -> ProbingConfig:
    return ProbingConfig(
        sparse_probing=SparseProbingConfig(
            tasks=OFFLINE_SPARSE_TASKS, train_per_class=450, test_per_class=110
        ),
        scr=ScrConfig(
            tasks=(*DEMO_SCR_TASKS, "hist_fig_politician_gender", "wikidata_politician_gender"),
            train_per_quadrant=68,
            test_per_quadrant=27,
        ),
        tpp=TppConfig(tasks=("news_topic", "it_ticket"), train_per_class=450, test_per_class=110),
        ood=OodConfig(),
        preset="offline",
    )


def _tiny() -> ProbingConfig:
    return ProbingConfig(
        sparse_probing=SparseProbingConfig(
            tasks=("world_country",), train_per_class=8, test_per_class=4, k_values=(1, 2)
        ),
        scr=ScrConfig(
            tasks=("hist_fig_american_gender",),
            train_per_quadrant=6,
            test_per_quadrant=3,
            n_values=(2, 5),
            headline_n=2,
        ),
        tpp=TppConfig(
            tasks=("world_country",),
            train_per_class=8,
            test_per_class=4,
            n_values=(2, 5),
            headline_n=2,
        ),
        # 128 training texts: one validation split per C (fewer take 6-fold CV)
        ood=OodConfig(tasks=("5_hist_fig_ismale",), n_train=128, k=16, context_length=64),
        preset="tiny",
    )


PRESETS = {"paper": ProbingConfig, "offline": _offline, "demo": _demo, "tiny": _tiny}
"""Preset name -> factory. paper: SAEBench's Hub datasets at the references' sizes (GPU and
Hub); offline: sae-probes tasks, near-reference sizes; demo: sae-probes tasks sized for a
2-core CPU; tiny: smoke tests."""


def probing_preset(name: str) -> ProbingConfig:
    """A fresh :class:`ProbingConfig` of preset ``name``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown probing preset {name!r}: choose from {', '.join(PRESETS)}"
        ) from None


def with_tasks(cfg: ProbingConfig, **tasks: tuple[str, ...] | None) -> ProbingConfig:
    """``cfg`` with the task lists given (metric name -> tasks; None keeps the preset's)."""
    for metric, names in tasks.items():
        if names:
            setattr(cfg, metric, replace(getattr(cfg, metric), tasks=tuple(names)))
    return cfg
