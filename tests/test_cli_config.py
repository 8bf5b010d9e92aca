"""The one config system of harvest / train / evaluate (masksae.cli_config) and the CLI's
shared vocabulary: precedence defaults < --config file < flags, dotted overrides, did-you-mean,
shipped examples that round-trip, short runs that export, -v and --json everywhere."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from test_train_fixtures import make_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args: str):
    from masksae.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _printed(*args: str) -> dict:
    result = _invoke(*args, "--print-config")
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.output)


def test_precedence_defaults_file_flags(tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text('tokens = 5000\nlayer = 3\nmodel = "bundled:gemma3-270m"\n')
    # no file: the dataclass defaults
    assert _printed("harvest")["tokens"] == 100_000
    # the file beats the defaults, a flag beats the file, untouched keys keep the file's value
    merged = _printed("harvest", "--config", cfg, "--layer", "4")
    assert (merged["tokens"], merged["layer"], merged["model"]) == (5000, 4, "bundled:gemma3-270m")
    # a bool flag, a repeatable list without comma splitting, KEY=VALUE tables with JSON values
    merged = _printed(
        "harvest",
        "--config",
        cfg,
        "--break-lock",
        "--corpus-filter",
        "a=b,c",
        "--corpus-filter",
        "d=e",
        "--storage-option",
        "anon=true",
    )
    assert merged["break_lock"] is True
    assert merged["corpus_filter"] == ["a=b,c", "d=e"]
    assert merged["storage_options"] == {"anon": True}


def test_train_dotted_overrides_and_grid_replacement(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        "[train]\nsteps = 12\nwarmup_steps = 2\nlr = 0.001\n"
        '[sae]\narchitecture = "batch_topk"\nd_sae = 32\n'
        "[grid]\nk = [2, 4]\nlr = [0.001, 0.002]\n"
    )
    merged = _printed(
        "train",
        "--config",
        sweep,
        "--train.warmup-steps",
        "7",
        "--sae.threshold-start-step",
        "3",
        "--k",
        "5",
        "--tokens",
        "4096",
    )
    assert merged["train"]["warmup_steps"] == 7
    assert merged["train"]["tokens"] == 4096 and "steps" not in merged["train"]  # flag's length
    assert merged["sae"]["threshold_start_step"] == 3 and merged["sae"]["k"] == 5
    assert merged["grid"] == {"lr": [0.001, 0.002]}  # --k replaced grid.k, lr untouched
    # --lr and --seed override the file now (they used to be refused with --config)
    merged = _printed("train", "--config", sweep, "--lr", "0.01", "--seed", "3")
    assert merged["train"]["lr"] == 0.01 and merged["train"]["seed"] == 3
    assert "lr" not in merged.get("grid", {}) and merged["grid"]["k"] == [2, 4]
    # flags alone: the single-SAE defaults, shown in --help too
    alone = _printed("train", "--d-sae", "64")
    assert alone["sae"] == {"architecture": "matryoshka_batch_topk", "d_sae": 64, "k": 40}


def test_evaluate_nested_tables_presets_and_aliases(tmp_path):
    merged = _printed(
        "evaluate",
        "--probing-preset",
        "tiny",
        "--scr-tasks",
        "a,b",
        "--absorption-max-words",
        "study",
        "--data.n-tokens",
        "99",
        "--cooccurrence.quantiles",
        "0.1,0.9",
    )
    assert merged["probing"]["preset"] == "tiny" and merged["probing"]["scr"]["tasks"] == ["a", "b"]
    assert merged["absorption"]["max_words_per_letter"] == 400  # the "study" preset
    assert merged["data"]["n_tokens"] == 99
    assert merged["cooccurrence"]["quantiles"] == [0.1, 0.9]
    # a file's preset is the base its other probing keys change
    cfg = tmp_path / "e.toml"
    cfg.write_text('[probing]\npreset = "tiny"\n[probing.tpp]\ntrain_per_class = 7\n')
    from masksae.evaluate.probing import probing_preset

    tiny = probing_preset("tiny")
    merged = _printed("evaluate", "--config", cfg)
    assert merged["probing"]["tpp"]["train_per_class"] == 7
    assert merged["probing"]["tpp"]["tasks"] == list(tiny.tpp.tasks)


@pytest.mark.parametrize(
    ("command", "text", "wanted"),
    [
        ("harvest", "tokns = 5\n", "did you mean 'tokens'?"),
        ("train", "[train]\nwarmup_step = 1\n", "did you mean 'warmup_steps'?"),
        ("train", "[sae]\nthreshold_start = 1\n", "did you mean 'threshold_start_step'?"),
        ("train", "[grids]\nk = [1]\n", "did you mean 'grid'?"),
        ("evaluate", "[data]\nn_token = 5\n", "did you mean 'n_tokens'?"),
    ],
)
def test_unknown_config_key_names_the_closest_and_the_file(tmp_path, command, text, wanted):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    result = _invoke(command, "--config", cfg, "--print-config")
    assert result.exit_code == 2
    assert wanted in result.output and str(cfg) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unknown_flag_suggests_the_dotted_name():
    result = _invoke("train", "--sae.kk", "3")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: no such option --sae.kk (did you mean '--sae.k'?): masksae train --help "
        "lists every flag"
    )


def test_shipped_examples_round_trip_through_config(tmp_path):
    listed = _invoke("config", "list", "--json")
    assert listed.exit_code == 0, listed.output
    examples = json.loads(listed.output)
    names = {e["name"]: e["command"] for e in examples}
    assert {"demo-sweep", "paper-pythia", "paper-gemma", "harvest-demo", "evaluate-demo"} <= set(
        names
    )
    assert names["study/demo"] == "study"
    for name, command in names.items():
        if command == "study":
            continue
        shown = _invoke("config", "show", name)
        assert shown.exit_code == 0, shown.output
        original = tomllib.loads(shown.output)
        path = tmp_path / f"{name}.toml"
        path.write_text(shown.output)
        merged = _printed(command, "--config", path)
        # every value of the example reaches the merged config
        for key, value in original.items():
            if isinstance(value, dict):
                for sub, item in value.items():
                    if not isinstance(item, dict) and key != "grid":
                        want = 100 if item == "demo" and sub == "max_words_per_letter" else item
                        assert merged[key][sub] == want, (name, key, sub)
            else:
                assert merged[key] == value, (name, key)
        # and the printed config is itself a --config file giving the same config
        again = tmp_path / f"{name}-printed.toml"
        again.write_text(_invoke(command, "--config", path, "--print-config").output)
        assert _printed(command, "--config", again) == merged
    assert json.loads(_invoke("config", "show", "demo-sweep", "--json").output)["grid"]["k"] == [
        20,
        40,
    ]
    missing = _invoke("config", "show", "demo-swep")
    assert missing.exit_code == 2 and "did you mean 'demo-sweep'?" in missing.output


def test_short_flag_only_run_scales_the_recipe_and_exports(tmp_path, caplog):
    store = tmp_path / "store"
    make_store(store, n_tokens=2048, chunk_tokens=512)  # 15 usable batches of 128
    base = ["train", "--store", store, "--architecture", "batch_topk", "--d-sae", "32"]
    base += ["--k", "2", "--batch-size", "128", "--device", "cpu", "--no-progress"]
    with caplog.at_level(logging.INFO, logger="masksae"):
        result = _invoke(*base, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    scaled = " ".join(r.getMessage() for r in caplog.records if "short run" in r.getMessage())
    assert "warmup_steps 1000 -> 1" in scaled and "threshold_start_step 1000 -> 1" in scaled
    assert "(15 steps)" in scaled
    assert "dead_tokens_threshold 10000000 -> 384" in scaled  # a fifth of 15 x 128 tokens
    assert "threshold_beta 0.999 -> 0.7857" in scaled  # 1 - 3 / 14 updates
    run = tmp_path / "out" / "batch_topk-k2-F32-s0"
    meta = json.loads((run / "config.json").read_text())
    assert meta["train"]["warmup_steps"] == 1 and meta["sae"]["threshold_start_step"] == 1
    exported = _invoke("export", run, "--format", "saelens", "--out", tmp_path / "sl")
    assert exported.exit_code == 0, exported.output
    # the run's folder shows as a sweep file that reproduces it
    text = _invoke("config", "show", run).output
    shown = tomllib.loads(text)
    assert shown["sae"]["threshold_start_step"] == 1 and shown["train"]["warmup_steps"] == 1
    (tmp_path / "run.toml").write_text(text)
    rerun = _printed("train", "--config", tmp_path / "run.toml")
    assert rerun["sae"] == shown["sae"] and rerun["train"]["batch_size"] == 128
    # an explicit threshold start the run never reaches is refused before anything is written
    refused = _invoke(*base, "--sae.threshold-start-step", "100", "--out", tmp_path / "o2")
    assert refused.exit_code == 2 and "--sae.threshold-start-step" in refused.output
    assert not (tmp_path / "o2").exists()


def test_fit_recipe_keeps_explicit_values_and_long_runs():
    from masksae.train.config import RunSpec, TrainConfig, fit_recipe_to_run

    runs = [RunSpec("a", {"architecture": "batch_topk", "d_sae": 32, "k": 2})]
    train, fitted, notes = fit_recipe_to_run(TrainConfig(batch_size=2048), runs, 244_140)
    assert train.warmup_steps == 1000 and fitted[0].sae == runs[0].sae and notes == []
    # a demo-sized run gets about the values configs/demo-sweep.toml chose by hand
    # (warmup 30, dead window 25000, beta 0.98 over ~150 updates)
    train, fitted, notes = fit_recipe_to_run(TrainConfig(batch_size=512), runs, 250)
    assert train.warmup_steps == 25
    assert fitted[0].sae == {
        **runs[0].sae,
        "threshold_start_step": 25,
        "dead_tokens_threshold": 25600,
        "threshold_beta": 0.9867,
    }
    explicit = [RunSpec("a", {**runs[0].sae, "threshold_start_step": 50})]
    train, fitted, notes = fit_recipe_to_run(TrainConfig(warmup_steps=3), explicit, 40)
    assert train.warmup_steps == 3 and fitted[0].sae["threshold_start_step"] == 50
    assert fitted[0].sae["dead_tokens_threshold"] == 40 * 2048 // 5
    assert notes == ["dead_tokens_threshold 10000000 -> 16384"]


def test_verbose_and_json_on_subcommands(tmp_path):
    store = tmp_path / "store"
    make_store(store, n_tokens=1024, chunk_tokens=512)
    info = _invoke("store", "info", "-v", store, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["n_tokens"] == 1024
    verify = _invoke("store", "verify", store, "--json", "--verbose", "--no-progress")
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.output)["ok"] is True
    tasks = _invoke("tasks", "list", "--json", "-v")
    assert tasks.exit_code == 0 and json.loads(tasks.output)[0]["name"]


HELP_SCRIPT = """
import json, sys
from masksae.cli import app  # first, as the masksae script does (plain, not rich, help)
from typer.testing import CliRunner
helps = {c: CliRunner().invoke(app, [*c.split(), "--help"]).output for c in sys.argv[1:]}
top = CliRunner().invoke(app, ["--help"]).output
heavy = [m for m in ("torch", "transformers", "masksae.harvest.config") if m in sys.modules]
print(json.dumps({"top": top, "heavy_after_top_help": heavy, "helps": helps}))
"""


def test_help_is_complete_plain_and_cheap():
    commands = ["harvest", "train", "evaluate", "export", "report", "study", "store info"]
    commands += ["store verify", "store copy", "tasks list", "config show"]
    out = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, *commands], capture_output=True, text=True, check=True
    )
    doc = json.loads(out.stdout)
    assert "..." not in doc["top"].split("Commands:")[1]  # full summaries, not cut short
    for command, text in doc["helps"].items():
        assert "-v, --verbose" in text, command
        assert not re.search(r"<[A-Za-z_\[\]]+>", text), command  # no <list[Path]> metavars
        assert "{" not in text.split("\n")[0], command  # usage: STORE, not {store}
    usage = doc["helps"]["evaluate"].split("\n")[0]
    assert usage.endswith("[OPTIONS] [CHECKPOINT]...")
    assert "--train.warmup-steps" in doc["helps"]["train"]
    assert "[default: 2048]" in doc["helps"]["train"]


def test_study_harvest_args_parse_as_the_same_config():
    from masksae.study.plan import harvest_args

    settings = {
        "tokens": 5000,
        "break_lock": True,
        "corpus_allow_undecodable": False,
        "storage_options": {"anon": True, "endpoint_url": "http://127.0.0.1:9000"},
        "corpus_filter": ["a=b,c"],
        "devices": ["cpu", "cpu"],
        "mask_prob": 0.25,
    }
    merged = _printed("harvest", *harvest_args(settings))
    assert {k: merged[k] for k in settings} == settings
