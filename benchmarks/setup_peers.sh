#!/usr/bin/env bash
# Install the peer libraries the benchmarks compare against into a separate venv under /tmp
# (never into the project's .venv): pinned versions, --no-deps so they run on the project's
# torch when benchmarks/peers.py appends this venv's site-packages to sys.path. Only the
# light pure-Python modules their training steps import are added.
set -euo pipefail
VENV="${MASKSAE_PEER_VENV:-/tmp/masksae-peers}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --no-deps \
  dictionary-learning==0.1.0 eai-sparsify==1.3.3 \
  einops natsort simple-parsing docstring-parser accelerate psutil pyyaml
echo "peers installed in $VENV"
