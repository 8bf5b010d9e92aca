#!/usr/bin/env bash
# The whole pipeline on the bundled model (SmolLM2-135M) and corpus, on CPU, in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/masksae
OUT=${DEMO_OUT:-runs/demo}
TOKENS=${DEMO_TOKENS:-60000}
for p in 0.0 0.3; do
  $M harvest --model bundled:smollm2-135m --layer 15 --corpus bundled --tokens "$TOKENS" \
    --mask-prob "$p" --context-length 128 --batch-size 8 --out "$OUT/store-p$p"
  $M store info "$OUT/store-p$p"
done
