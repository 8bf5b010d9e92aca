#!/usr/bin/env bash
# `make demo`: the whole pipeline on the bundled model (SmolLM2-135M, layer 15) and the bundled
# corpus, offline on CPU: harvest unmasked (p=0) and masked (p=0.3) stores, train a
# two-SAE MatryoshkaBatchTopK sweep on each, score every checkpoint (core metrics, absorption,
# and the probing suite on the sae-probes datasets: sparse probing, SCR, TPP, OOD), and write
# the report.
# Sizes are demo-sized (minutes on 2 cores); the paper's sizes are in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MASKSAE:-.venv/bin/masksae}
OUT=${DEMO_OUT:-runs/demo}
TOKENS=${DEMO_TOKENS:-60000}
LAYER=${DEMO_LAYER:-15}
# absorption vocabulary: the "demo" preset of AbsorptionConfig's VOCAB_PRESETS (words per
# letter, chosen by measurement: docs/bench/absorption-vocab.md); a number overrides it
ABSORPTION_WORDS=${DEMO_ABSORPTION_WORDS:-demo}
TRAIN_CONFIG=${DEMO_TRAIN_CONFIG:-configs/demo-sweep.toml}
EVAL_TOKENS=${DEMO_EVAL_TOKENS:-8192}
CE_SEQUENCES=${DEMO_CE_SEQUENCES:-16}
METRICS=${DEMO_METRICS:-core,absorption,cooccurrence,sparse_probing,scr,tpp,ood}
PROBING_PRESET=${DEMO_PROBING_PRESET:-demo}

for p in 0.0 0.3; do
  store="$OUT/stores/p$p"
  $M harvest --model bundled:smollm2-135m --layer "$LAYER" --corpus bundled --tokens "$TOKENS" \
    --mask-prob "$p" --context-length 128 --batch-size 8 --seed 0 --out "$store"
  $M store verify "$store"
  $M store info "$store"
  # --resume makes a rerun of the demo continue (or skip) finished training instead of refusing
  resume=""; [ -f "$OUT/sae/p$p/sweep.json" ] && resume="--resume"
  $M train --store "$store" --config "$TRAIN_CONFIG" --out "$OUT/sae/p$p" $resume
done

$M evaluate --checkpoints "$OUT/sae/p0.0" "$OUT/sae/p0.3" --metrics "$METRICS" \
  --probing-preset "$PROBING_PRESET" \
  --absorption-max-words "$ABSORPTION_WORDS" --eval-tokens "$EVAL_TOKENS" --ce-sequences "$CE_SEQUENCES" \
  --cache "$OUT/eval-cache" --out "$OUT/eval"
$M report "$OUT/eval" --out "$OUT/report"
echo
echo "demo finished: report in $OUT/report/report.md"
cat "$OUT/report/report.md"
