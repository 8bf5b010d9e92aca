"""Absorption vocabulary size: the score's standard error vs the LLM cost (run by hand).

Measures, on the bundled SmolLM2-135M at layer 15 and trained checkpoints, what the
absorption vocabulary cap (``AbsorptionConfig.max_words_per_letter`` = W) buys:

1. One LLM pass at the largest size W_max computes the probe prompts of every word and the
   absorption prompts of *every* test word (not only the probe's true positives), timed.
2. Every smaller W (and W_max) is a seeded subsample of that vocabulary, per letter, with
   each word keeping its train/test side; the ground-truth probe is retrained on the
   subsample, so each W has its own eligible letters, true positives, main latents and score
   (``pipeline.score_stage``, the code `run` uses). Sizes below W_max are drawn `--repeats`
   times: the spread of the score over draws is the vocabulary noise the standard error
   should describe. (The in-context examples of a subsample's prompts come from the W_max
   pool: a difference of example draws only.)
3. The cost of W = its prompts (train + test + true positives) x the measured seconds per
   prompt of step 1.
4. With ``--compare-src``: the same checkpoints scored at ``--compare-words`` by the
   pipeline of another source tree (e.g. the code before the SAEBench-matching fixes,
   ``git archive <commit> src | tar -x -C /tmp/old``) and by this one, directly.

Writes a Markdown page (``--out``) and the raw figures (``--json``). Not part of `make bench`
(it needs trained checkpoints and ~an hour on 2 busy cores):

    .venv/bin/python benchmarks/absorption_vocab.py --checkpoints runs/demo/sae/p0.0/* \
        runs/demo/sae/p0.3/* --cache runs/absorption-vocab --out docs/bench/absorption-vocab.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

MODEL = "bundled:smollm2-135m"
LAYER = 15
log = logging.getLogger("absorption_vocab")


def _label(path: Path, meta: dict) -> str:
    p = (meta.get("store") or {}).get("mask_prob") or 0.0
    k = (meta.get("sae") or {}).get("k")
    return f"p={float(p):g} k={k}"


def _full_stage(lm, cfg, bos, w_max: int, cache: Path) -> dict[str, Any]:
    """Prompts and activations at W_max (cached in `cache`); absorption prompts for every
    test word."""
    from masksae.evaluate.absorption.activations import encode_prompts, word_activations
    from masksae.evaluate.absorption.prompts import build_prompts
    from masksae.evaluate.absorption.vocab import alpha_vocab, cap_per_letter, split_vocab

    vocab = cap_per_letter(alpha_vocab(lm.tokenizer), w_max, cfg.seed)
    train_words, test_words = split_vocab(vocab, cfg.train_fraction, cfg.seed)
    common = dict(
        n_examples=cfg.n_icl_examples,
        template=cfg.prompt_template,
        answer_template=cfg.answer_template,
        separator=cfg.example_separator,
        prepend_separator=True,
    )
    prompts = {
        "train": build_prompts(train_words, train_words, cfg.seed, **common),
        "test": build_prompts(test_words, test_words, cfg.seed + 1, **common),
        "abs": build_prompts(test_words, vocab, cfg.seed + 2, **common),
    }
    out: dict[str, Any] = {"vocab": vocab, "train_words": train_words, "test_words": test_words}
    cache.mkdir(parents=True, exist_ok=True)
    for name, plist in prompts.items():
        path = cache / f"W{w_max}-{name}.pt"
        n_tokens = sum(len(ids) for ids in encode_prompts(lm.tokenizer, plist, bos))
        if path.exists():
            saved = torch.load(path)
        else:
            start = time.perf_counter()
            x = word_activations(lm, plist, LAYER, cfg.llm_batch_size, bos)
            saved = {"x": x, "seconds": time.perf_counter() - start, "tokens": n_tokens}
            torch.save(saved, path)
        out[name] = saved
        log.info("%s: %d prompts, %d tokens, %.1f s", name, len(plist), n_tokens, saved["seconds"])
    return out


def _sub_stage(full: dict[str, Any], cfg, words_per_letter: int, draw: int):
    """LLMStage of a seeded per-letter subsample of the W_max vocabulary (probe retrained)."""
    from masksae.evaluate.absorption.cache import LLMStage
    from masksae.evaluate.absorption.probes import train_letter_probe
    from masksae.evaluate.absorption.vocab import cap_per_letter, first_letter_index

    keep = set(cap_per_letter(full["vocab"], words_per_letter, seed=10_000 * draw + 7))
    tr = [i for i, w in enumerate(full["train_words"]) if w in keep]
    te = [i for i, w in enumerate(full["test_words"]) if w in keep]
    train_words = [full["train_words"][i] for i in tr]
    test_words = [full["test_words"][i] for i in te]
    y_train = torch.tensor([first_letter_index(w) for w in train_words])
    y_test = torch.tensor([first_letter_index(w) for w in test_words])
    x_train, x_test, x_abs = (
        full[n]["x"][idx] for n, idx in (("train", tr), ("test", te), ("abs", te))
    )
    probe = train_letter_probe(x_train, y_train, cfg, torch.device("cpu"))
    is_tp = probe.logits(x_test)[torch.arange(len(te)), y_test] > 0
    return LLMStage(
        train_words=train_words,
        test_words=test_words,
        x_train_ND=x_train,
        y_train_N=y_train,
        x_test_ND=x_test,
        y_test_N=y_test,
        probe_W_CD=probe.W_CD,
        probe_b_C=probe.b_C,
        abs_words=[w for w, t in zip(test_words, is_tp.tolist(), strict=True) if t],
        x_abs_ND=x_abs[is_tp],
        y_abs_N=y_test[is_tp],
    )


def _row(res: dict[str, Any]) -> dict[str, Any]:
    extra = res["all_eligible_letters"]
    return {
        "n_eligible": res["n_eligible_letters"],
        "headline": res["absorption_paper_convention"],
        "headline_se": res["absorption_paper_convention_se"],
        "all_letters": extra["absorption_paper_convention"],
        "all_letters_se": extra["absorption_paper_convention_se"],
        "n_true_positives": extra["n_true_positives"],
        "main_latents": extra["mean_num_main_latents"],
    }


def _old_scores(src: Path, checkpoints: list[Path], words: int, cache: Path) -> list[dict]:
    """Score `checkpoints` with the absorption pipeline of the source tree `src`."""
    code = f"""
import json, sys, torch
torch.set_num_threads({torch.get_num_threads()})
from masksae.models import load_model
from masksae.train.checkpoint import load_sae
from masksae.evaluate.absorption import AbsorptionConfig, run
lm = load_model({MODEL!r}, device="cpu")
out = []
for path in {[str(c) for c in checkpoints]!r}:
    sae, meta = load_sae(path)
    out.append(run(sae, lm, {LAYER}, AbsorptionConfig(max_words_per_letter={words}),
                   cache_dir={str(cache)!r}))
print("RESULT" + json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _binomial_pct(per_letter: dict) -> tuple[float, float, int]:
    """(paper-convention score, its binomial SE, true positives) of an old result's letters."""
    from masksae.evaluate.absorption.summary import binomial_se

    rows = [r for r in per_letter.values() if r["n_true_positives"] > 0]
    rates = [r["full_absorption_rate"] for r in rows]
    counts = [r["n_true_positives"] for r in rows]
    return (
        100 * (1 - statistics.fmean(rates)),
        100 * binomial_se(rates, counts),
        sum(counts),
    )


def _fmt(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "null"
    return f"{v:.1f}" if se is None else f"{v:.1f} ± {se:.1f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="+", type=Path, required=True)
    parser.add_argument("--max-words", type=int, default=150)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 150])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--compare-src", type=Path)
    parser.add_argument("--compare-words", type=int, default=50)
    parser.add_argument(
        "--compare-new-direct",
        action="store_true",
        help="also run this pipeline end to end at --compare-words (else the subsample rows "
        "of that size are the 'after')",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from masksae.evaluate.absorption import AbsorptionConfig, run
    from masksae.evaluate.absorption.pipeline import score_stage
    from masksae.evaluate.absorption.prompts import resolve_bos
    from masksae.models import load_model
    from masksae.train.checkpoint import load_sae

    lm = load_model(MODEL, device="cpu")
    saes = []
    for path in args.checkpoints:
        sae, meta = load_sae(path)
        saes.append((_label(path, meta), sae))
    cfg = AbsorptionConfig(max_words_per_letter=args.max_words)
    bos = resolve_bos(lm.tokenizer, cfg.prepend_bos)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_start": os.getloadavg()[0],
    }

    # before at one size (the other source tree, end to end); after: the subsample rows of
    # that size, or with --compare-new-direct this pipeline end to end as well
    if args.compare_src is not None:
        start = time.perf_counter()
        old = _old_scores(
            args.compare_src, args.checkpoints, args.compare_words, args.cache / "old"
        )
        report["compare"] = {
            "words": args.compare_words,
            "old_seconds": time.perf_counter() - start,
            "old_rows": [
                {
                    "sae": label,
                    "old_n_eligible": o["n_eligible_letters"],
                    "old": _binomial_pct(o["per_letter"]) if o["per_letter"] else None,
                    "old_main_latents": o["mean_num_main_latents"],
                }
                for (label, _), o in zip(saes, old, strict=True)
            ],
        }
        if args.compare_new_direct:
            new = [
                run(
                    sae,
                    lm,
                    LAYER,
                    AbsorptionConfig(max_words_per_letter=args.compare_words),
                    cache_dir=args.cache / "new",
                )
                for _, sae in saes
            ]
            report["compare"]["rows"] = [
                {**o_row, **{f"new_{k}": v for k, v in _row(n).items()}}
                for o_row, n in zip(report["compare"]["old_rows"], new, strict=True)
            ]

    full = _full_stage(lm, cfg, bos, args.max_words, args.cache)
    seconds = sum(full[n]["seconds"] for n in ("train", "test", "abs"))
    n_prompts = sum(len(full[n]["x"]) for n in ("train", "test", "abs"))
    tokens = sum(full[n]["tokens"] for n in ("train", "test", "abs"))
    report["llm"] = {
        "prompts": n_prompts,
        "tokens": tokens,
        "seconds": seconds,
        "s_per_prompt": seconds / n_prompts,
        "tokens_per_prompt": tokens / n_prompts,
    }
    rows = []
    for words in sorted({*args.sizes, args.max_words}):
        for draw in range(args.repeats if words < args.max_words else 1):
            stage = _sub_stage(full, cfg, words, draw)
            prompts = len(stage.train_words) + len(stage.test_words) + len(stage.abs_words)
            for label, sae in saes:
                res = score_stage(
                    sae, stage, LAYER, AbsorptionConfig(max_words_per_letter=words), bos
                )
                rows.append(
                    {
                        "words": words,
                        "draw": draw,
                        "sae": label,
                        "prompts": prompts,
                        "llm_s": prompts * seconds / n_prompts,
                        **_row(res),
                    }
                )
                log.info("%s", rows[-1])
                if words == args.max_words:  # the full results of the largest size
                    report.setdefault("results_at_max", {})[label] = res
    report["rows"] = rows
    report["load_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    text = _markdown(report, args)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def _markdown(report: dict[str, Any], args) -> str:
    llm = report["llm"]
    lines = [
        "# Absorption vocabulary size: standard error vs cost",
        "",
        f"Measured by `benchmarks/absorption_vocab.py` on {report['machine']}; bundled "
        f"SmolLM2-135M layer {LAYER}; checkpoints: "
        + ", ".join(f"`{c}`" for c in args.checkpoints)
        + f". 1-minute load average {report['load_start']:.1f} at the start, "
        f"{report['load_end']:.1f} at the end (2 cores shared with other jobs: absolute "
        "times are pessimistic; re-measure on a quiet machine).",
        "",
        f"LLM pass at W_max = {args.max_words}: {llm['prompts']} prompts, "
        f"{llm['tokens_per_prompt']:.1f} tokens each (BOS + prompt up to the word), "
        f"{llm['seconds']:.0f} s = **{llm['s_per_prompt']:.3f} s per prompt**.",
        "",
        "Scores in the paper's convention 100 (1 - mean full absorption), ± binomial SE. "
        "`headline` = SAEBench rule (null below 20 eligible letters); `all letters` = mean "
        "over every eligible letter. For W < W_max the table shows the mean over "
        f"{args.repeats} subsample draws and, in `spread`, the sample std of the all-letters "
        "score over the draws (to compare with the SE).",
        "",
        "| W | SAE | prompts | LLM s | eligible | headline | all letters ± SE | spread | TPs | main latents |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault((r["words"], r["sae"]), []).append(r)
    for (words, sae), rs in groups.items():

        def mean(key, rs=rs):
            vals = [r[key] for r in rs if r[key] is not None]
            return statistics.fmean(vals) if vals else None

        allv = [r["all_letters"] for r in rs if r["all_letters"] is not None]
        spread = statistics.stdev(allv) if len(allv) > 1 else None
        n_null = sum(r["headline"] is None for r in rs)
        head = _fmt(mean("headline"), mean("headline_se"))
        if n_null:
            head += f" ({n_null}/{len(rs)} null)"
        lines.append(
            f"| {words} | {sae} | {mean('prompts'):.0f} | {mean('llm_s'):.0f} | "
            f"{mean('n_eligible'):.1f} | {head} | "
            f"{_fmt(mean('all_letters'), mean('all_letters_se'))} | "
            f"{'' if spread is None else f'{spread:.1f}'} | {mean('n_true_positives'):.0f} | "
            f"{_num(mean('main_latents'))} |"
        )
    if "compare" in report and "rows" not in report["compare"]:
        c = report["compare"]
        lines += [
            "",
            f"## Before at W = {c['words']} (the code of `--compare-src`, end to end)",
            "",
            "No BOS, probe prompts without the leading separator, L1 probe from zeros, mean over "
            "any number of eligible letters; compare with the rows of W = "
            f"{c['words']} above (after).",
            "",
            "| SAE | eligible | score ± SE (TPs) | main latents |",
            "|---|---|---|---|",
        ]
        for r in c["old_rows"]:
            old = r["old"]
            old_txt = "null" if old is None else f"{old[0]:.1f} ± {old[1]:.1f} ({old[2]})"
            lines.append(
                f"| {r['sae']} | {r['old_n_eligible']} | {old_txt} | {_num(r['old_main_latents'])} |"
            )
    if "compare" in report and "rows" in report["compare"]:
        c = report["compare"]
        lines += [
            "",
            f"## Before / after at W = {c['words']} (each pipeline end to end)",
            "",
            "`before`: the code given by `--compare-src` (no BOS, probe prompts without the "
            "leading separator, L1 probe from zeros, mean over any number of eligible "
            "letters). `after`: this code. Both draw the same words (same seed and cap), so "
            "they differ only by the pipeline.",
            "",
            "| SAE | before: eligible | before: score ± SE (TPs) | before: main latents | "
            "after: eligible | after: headline | after: all letters ± SE (TPs) | "
            "after: main latents |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            old = r["old"]
            old_txt = "null" if old is None else f"{old[0]:.1f} ± {old[1]:.1f} ({old[2]})"
            lines.append(
                f"| {r['sae']} | {r['old_n_eligible']} | {old_txt} | "
                f"{_num(r['old_main_latents'])} | "
                f"{r['new_n_eligible']} | {_fmt(r['new_headline'], r['new_headline_se'])} | "
                f"{_fmt(r['new_all_letters'], r['new_all_letters_se'])} "
                f"({r['new_n_true_positives']}) | {_num(r['new_main_latents'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
