"""masksae study: config validation, the stage plan, and a tiny study end to end (stores with
controls, two seeds, evaluation, reports), a failed stage and the resume that continues it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from masksae.errors import ConfigError
from masksae.study import load_study, plan_stages, run_study, study_from_dict
from masksae.study.config import apply_overrides
from masksae.study.plan import harvest_args, toml_dumps

REPO = Path(__file__).resolve().parents[1]

TINY_SWEEP = """
[train]
steps = 16
batch_size = 64
warmup_steps = 2
checkpoint_every = 8
log_every = 8
device = "cpu"

[sae]
architecture = "matryoshka_batch_topk"
d_sae = 64
threshold_start_step = 4
dead_tokens_threshold = 500

[grid]
k = [4, 8]
"""


def _study_dict(model: Path, corpus: Path, sweep: Path) -> dict:
    return {
        "name": "tiny",
        "banner": "TINY TEST STUDY",
        "device": "cpu",
        "progress": False,
        "harvest": {
            "model": str(model),
            "layer": 1,
            "corpus": str(corpus),
            "tokens": 640,
            "context_length": 32,
            "batch_size": 4,
            "chunk_sequences": 8,
        },
        "train": {"sweep": str(sweep), "seeds": [0, 1]},
        "evaluate": {
            "metrics": "core",
            "eval_tokens": 256,
            "ce_sequences": 2,
            "extra_args": ["--eval-corpus", str(corpus)],
        },
        "store": [
            {"name": "p0.0", "mask_prob": 0.0},
            {"name": "p0.3", "mask_prob": 0.3, "k": [4]},
            {"name": "p0.5", "mask_prob": 0.5, "k": []},
            {
                "name": "unigram",
                "role": "control",
                "mask_prob": 0.3,
                "k": [4],
                "harvest": {"corruption": "random_unigram"},
            },
            {
                "name": "noise",
                "role": "control",
                "mask_prob": 0.3,
                "k": [4],
                "harvest": {"corruption": "noise", "noise_calibration_sequences": 4},
            },
        ],
    }


@pytest.fixture()
def tiny_study(tmp_path, tiny_model_dir, tiny_corpus_jsonl):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(TINY_SWEEP)
    return _study_dict(tiny_model_dir, tiny_corpus_jsonl, sweep), tmp_path


def test_shipped_study_configs_load_and_plan(tmp_path):
    for name in ("demo", "study", "paper-pythia", "paper-gemma"):
        cfg = load_study(REPO / "configs" / "study" / f"{name}.toml")
        assert plan_stages(cfg, tmp_path / name)  # sweep files exist, every store plans
    study = load_study(REPO / "configs" / "study" / "study.toml")
    assert len(study.train.seeds) >= 3
    main = {s.name: s for s in study.stores if s.role == "main"}
    assert main["p0.0"].k == main["p0.3"].k == [20, 40, 80, 160]
    assert main["p0.2"].k == main["p0.5"].k == [20]
    kinds = {s.harvest.get("corruption", "mask") for s in study.stores if s.role == "control"}
    assert kinds == {"mask", "random_uniform", "random_unigram", "delete", "noise"}
    assert all(s.mask_prob == 0.3 for s in study.stores if s.role == "control")


def test_overrides_and_validation(tiny_study):
    data, _ = tiny_study
    data = apply_overrides(
        data,
        ["harvest.tokens=320", "train.seeds=[3]", "store.p0.3.k=[8]", 'evaluate.metrics="x,y"'],
    )
    cfg = study_from_dict(data)
    assert cfg.harvest.settings["tokens"] == 320 and cfg.train.seeds == [3]
    assert cfg.store("p0.3").k == [8] and cfg.evaluate.metrics == "x,y"
    bad = [
        ({"harvest": {**data["harvest"], "mask_prob": 0.1}}, "set per store"),
        ({"harvest": {**data["harvest"], "tokenz": 1}}, "unknown HarvestConfig field"),
        ({"store": [*data["store"], data["store"][0]]}, "repeat"),
        ({"store": [{"name": "x", "mask_prob": 0.1, "role": "other"}]}, "role"),
        ({"train": {**data["train"], "seeds": [1, 1]}}, "distinct"),
        ({"report": {"controls_baseline": "nope"}}, "'nope'"),
        ({"colour": 1}, "unknown key"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            study_from_dict({**data, **change})
    with pytest.raises(ConfigError, match="no \\[\\[store\\]\\] name matches"):
        apply_overrides(data, ["store.p9.k=[1]"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(data, ["harvest.tokens"])


def test_plan_sweep_files_seeds_and_commands(tiny_study):
    data, tmp = tiny_study
    cfg = study_from_dict(data)
    stages = {s.key: s for s in plan_stages(cfg, tmp / "out")}
    assert "train/p0.5/s0" not in stages and "evaluate/p0.5" not in stages  # k = []: harvest only
    assert [k for k in stages if k.startswith("report")] == [
        "report/main",
        "report/controls/unigram",
        "report/controls/noise",
    ]
    for seed in (0, 1):
        ((path, text),) = stages[f"train/p0.0/s{seed}"].files.items()
        sweep = tomllib.loads(text)
        assert sweep["train"]["seed"] == sweep["train"]["data_seed"] == seed
        assert sweep["grid"] == {"k": [4, 8]}  # the base sweep's k (the store gives none)
        assert sweep["sae"]["d_sae"] == 64 and sweep["train"]["steps"] == 16
    assert tomllib.loads(next(iter(stages["train/p0.3/s1"].files.values())))["grid"]["k"] == [4]
    harvest = stages["harvest/noise"].commands[0]
    assert harvest[harvest.index("--corruption") + 1] == "noise"
    assert harvest[harvest.index("--mask-prob") + 1] == "0.3"
    ev = stages["evaluate/p0.3"].commands[0]
    assert ev[ev.index("--checkpoints") + 1 : ev.index("--out")] == [
        str(tmp / "out" / "sae" / "p0.3" / "s0"),
        str(tmp / "out" / "sae" / "p0.3" / "s1"),
    ]
    assert ev[-2:] == ["--eval-corpus", data["evaluate"]["extra_args"][1]]
    assert stages["report/controls/noise"].commands[0][1:3] == [
        str(tmp / "out" / "eval" / "p0.0"),
        str(tmp / "out" / "eval" / "noise"),
    ]
    cfg.train.vary_data_order = False
    text = next(iter(plan_stages(cfg, tmp / "o")[1].files.values()))
    assert "data_seed" not in tomllib.loads(text)["train"]


def test_harvest_args_and_toml_writer_round_trip():
    args = harvest_args(
        {
            "corpus_filter": ("a=1", "b=2"),
            "devices": ["cuda:0", "cuda:1"],
            "layer": None,
            "mask_prob": 0.25,
        }
    )
    assert args == [
        "--corpus-filter", "a=1", "--corpus-filter", "b=2",
        "--devices", "cuda:0,cuda:1", "--mask-prob", "0.25",
    ]  # fmt: skip
    data = {"train": {"lr": 1e-4, "on": True, "name": 'a "b"', "betas": [0.9, 0.99]}, "grid": {}}
    assert tomllib.loads(toml_dumps(data)) == data


def test_tiny_study_end_to_end_then_a_failed_stage_and_its_resume(tiny_study, capsys):
    from masksae.cli import app
    from masksae.evaluate.schema import load_result
    from masksae.storage import ActivationStore

    data, tmp = tiny_study
    out = tmp / "out"
    cfg = study_from_dict(apply_overrides(data, ['evaluate.metrics="bogus"']))
    with pytest.raises(Exception, match="stage evaluate/p0.0 failed"):
        run_study(cfg, out)
    state = json.loads((out / "study-state.json").read_text())
    assert sorted(state["stages"]) == sorted(
        [f"harvest/{s}" for s in ("p0.0", "p0.3", "p0.5", "unigram", "noise")]
        + [f"train/{s}/s{i}" for s in ("p0.0", "p0.3", "unigram", "noise") for i in (0, 1)]
    )
    assert (
        ActivationStore.open(out / "stores" / "noise").provenance["corruption"]["kind"] == "noise"
    )
    # the same command, fixed, continues: nothing harvested or trained again
    result = CliRunner().invoke(
        app,
        ["study", "unused.toml", "--out", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    outcomes = run_study(study_from_dict(data), out, echo=lambda *_: None)
    ran = [o.key for o in outcomes if o.status == "ran"]
    assert ran == [
        "evaluate/p0.0",
        "evaluate/p0.3",
        "evaluate/unigram",
        "evaluate/noise",
        "report/main",
        "report/controls/unigram",
        "report/controls/noise",
    ]
    results = sorted((out / "eval" / "p0.0").glob("*.json"))
    assert [r.name.split("__")[0] for r in results] == ["s0", "s0", "s1", "s1"]
    docs = [load_result(r) for r in results]
    assert sorted((d["provenance"]["k"], d["provenance"]["seed"]) for d in docs) == [
        (4, 0), (4, 1), (8, 0), (8, 1)
    ]  # fmt: skip
    noise = [load_result(r) for r in (out / "eval" / "noise").glob("*.json")]
    assert {d["provenance"]["corruption"] for d in noise} == {"noise"}
    # two seeds = two inits and two data orders: different weights
    w0 = (out / "sae" / "p0.3" / "s0").glob("*/sae.safetensors")
    w1 = (out / "sae" / "p0.3" / "s1").glob("*/sae.safetensors")
    assert next(w0).read_bytes() != next(w1).read_bytes()
    assert (out / "report" / "report.md").is_file()
    index = (out / "report-controls" / "index.md").read_text()
    assert "random unigram p=0.3" in index and "noise sigma=" in index
    assert (out / "report-controls" / "noise" / "report.md").is_file()
    table = (out / "stages.md").read_text()
    assert "| harvest/p0.0 |" in table and "masksae harvest --model" in table
    # a rerun skips every stage but the (cheap) reports; an interrupted training resumes
    state = json.loads((out / "study-state.json").read_text())
    del state["stages"]["train/p0.3/s1"]
    (out / "study-state.json").write_text(json.dumps(state))
    lines: list[str] = []
    outcomes = run_study(study_from_dict(data), out, dry_run=True, echo=lines.append)
    planned = [o.key for o in outcomes if o.status == "planned"]
    assert planned[:2] == ["train/p0.3/s1", "evaluate/p0.3"]
    assert any("--resume" in line for line in lines)
    assert lines[0].startswith("#") and "# TINY TEST STUDY #" in lines[0]


def test_projection_of_the_remaining_time_by_stage_kind():
    from masksae.study.plan import Stage, k_weight
    from masksae.study.runner import project_remaining

    def stage(key, kind, work):
        return Stage(key, kind, [[key]], work=work)

    stages = [
        stage("harvest/a", "harvest", 1000),
        stage("train/a", "train", 10),
        stage("harvest/b", "harvest", 3000),
        stage("train/b", "train", 20),
        stage("evaluate/a", "evaluate", 4),
    ]
    done = {"harvest/a": {"seconds": 60.0}, "train/a": {"seconds": 30.0}}
    text = project_remaining(stages[2:], stages, done)
    # 3000 tokens at 0.06 s/token = 180 s, 20 units at 3 s/unit = 60 s: 4 min
    assert text == "projected remaining ~4 min (harvest 3.0, train 1.0) + evaluate not timed yet"
    assert project_remaining([], stages, done) == ""
    assert (
        project_remaining(stages[4:], stages, {}) == "projected remaining: evaluate not timed yet"
    )
    assert k_weight(20) == 1.0 and k_weight(160) == pytest.approx(1 + 140 / 300)
