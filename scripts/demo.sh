#!/usr/bin/env bash
# `make demo`: the whole pipeline on the bundled model (SmolLM2-135M, layer 15) and the bundled
# corpus, offline on CPU, at smoke-run scale: `masksae study configs/study/demo.toml` harvests
# unmasked (p=0) and masked (p=0.3) stores, trains a two-SAE MatryoshkaBatchTopK sweep on each,
# scores every checkpoint (core, absorption with the "demo" vocabulary preset, co-occurrence, the
# probing suite) and
# writes the report. It is the study's pipeline at its smallest scale (make study: the CPU study;
# make paper: the paper's protocol). A rerun continues. DEMO_* variables override the config:
# DEMO_ABSORPTION_WORDS takes a preset name of AbsorptionConfig's VOCAB_PRESETS or a number.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MASKSAE:-.venv/bin/masksae}
OUT=${DEMO_OUT:-runs/demo}
CONFIG=${DEMO_CONFIG:-configs/study/demo.toml}
sets=()
[ -n "${DEMO_TOKENS:-}" ] && sets+=(--set "harvest.tokens=$DEMO_TOKENS")
[ -n "${DEMO_LAYER:-}" ] && sets+=(--set "harvest.layer=$DEMO_LAYER")
[ -n "${DEMO_TRAIN_CONFIG:-}" ] && sets+=(--set "train.sweep=\"$DEMO_TRAIN_CONFIG\"")
[ -n "${DEMO_ABSORPTION_WORDS:-}" ] && sets+=(--set "evaluate.absorption_max_words=$DEMO_ABSORPTION_WORDS")
[ -n "${DEMO_EVAL_TOKENS:-}" ] && sets+=(--set "evaluate.eval_tokens=$DEMO_EVAL_TOKENS")
[ -n "${DEMO_CE_SEQUENCES:-}" ] && sets+=(--set "evaluate.ce_sequences=$DEMO_CE_SEQUENCES")
[ -n "${DEMO_METRICS:-}" ] && sets+=(--set "evaluate.metrics=\"$DEMO_METRICS\"")
[ -n "${DEMO_PROBING_PRESET:-}" ] && sets+=(--set "evaluate.probing_preset=\"$DEMO_PROBING_PRESET\"")

$M study "$CONFIG" --out "$OUT" "${sets[@]}"
echo
echo "demo finished: report in $OUT/report/report.md"
cat "$OUT/report/report.md"
echo
echo "(smoke run: the numbers above are noise - see make study / make paper in README.md)"
