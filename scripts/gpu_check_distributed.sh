#!/usr/bin/env bash
# GPU check of the distributed paths (issue 10): run on a CUDA machine after `make setup`
# with a CUDA torch in .venv (or PY=<python with CUDA torch>). Called by
# `make gpu-check-distributed` and at the end of `make gpu-check` (scripts/gpu_check.sh).
#
#  1. harvest with torchrun on 2 ranks (both on GPU 0 when there is one GPU: the harvest
#     only uses gloo for control messages) == single-process CUDA harvest (same store
#     fingerprint: the chunks are computed by the same kernels at the same batch shapes);
#  2. a sweep spread over 2 ranks ("runs" mode) == the same sweep in one process (weights
#     bit-equal, each run computed alone on its GPU);
#  3. with >= 2 GPUs: one SAE data-parallel over NCCL (DDP) close to one process.
# Prints PASS/FAIL lines; exits non-zero on the first failure.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
MASKSAE=${MASKSAE:-$(dirname "$PY")/masksae}
WORK=$(mktemp -d /tmp/masksae-gpu-dist.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "FAIL: no CUDA device visible to torch"; exit 1; }
echo "== $NGPU GPU(s); torch $($PY -c 'import torch; print(torch.__version__)')"

$PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
from masksae.models.tiny import build_tiny_model
work = Path(sys.argv[1])
build_tiny_model(work / "model", "llama", n_layers=4, d_model=64, max_context=256)
lines = [" ".join(["the cat sat on a mat while dogs ran far"] * 8) for _ in range(600)]
(work / "corpus.txt").write_text("\n\n".join(lines))
PYEOF

H=(harvest --no-progress --model "$WORK/model" --layer 2 --corpus "$WORK/corpus.txt"
   --tokens 16384 --context-length 64 --batch-size 8 --chunk-sequences 16 --mask-prob 0.3
   --dtype bfloat16 --device cuda --seed 1)
"$MASKSAE" "${H[@]}" --out "$WORK/single"
$TORCHRUN --standalone --nproc-per-node 2 -m masksae "${H[@]}" --out "$WORK/ranks"
$PY - "$WORK" <<'PYEOF'
import sys
from masksae.storage import ActivationStore
a = ActivationStore.open(f"{sys.argv[1]}/single")
b = ActivationStore.open(f"{sys.argv[1]}/ranks")
assert a.verify() == [] and b.verify() == []
ok = a.fingerprint == b.fingerprint
print(("PASS" if ok else "FAIL") + f": torchrun harvest on CUDA == single process ({a.fingerprint} vs {b.fingerprint})")
sys.exit(0 if ok else 1)
PYEOF

cat > "$WORK/sweep.toml" <<'TOML'
[train]
steps = 30
batch_size = 1024
warmup_steps = 5
log_every = 10
[sae]
architecture = "matryoshka_batch_topk"
d_sae = 512
[grid]
k = [8, 16, 32]
TOML
T=(train --no-progress --store "$WORK/single" --config "$WORK/sweep.toml")
"$MASKSAE" "${T[@]}" --out "$WORK/sae-one" --device cuda
$TORCHRUN --standalone --nproc-per-node 2 -m masksae "${T[@]}" --out "$WORK/sae-ranks" --device cuda --distributed runs
$PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
w = Path(sys.argv[1])
bad = []
for run in sorted(p.name for p in (w / "sae-one").iterdir() if p.is_dir()):
    a, b = load_file(str(w / "sae-one" / run / "sae.safetensors")), load_file(str(w / "sae-ranks" / run / "sae.safetensors"))
    bad += [f"{run}.{k}" for k in a if not torch.equal(a[k], b[k])]
print(("PASS" if not bad else "FAIL") + f": sweep spread over 2 ranks == one process {bad[:5]}")
sys.exit(1 if bad else 0)
PYEOF

if [ "$NGPU" -ge 2 ]; then
  cat > "$WORK/one.toml" <<'TOML'
[train]
steps = 20
batch_size = 2048
warmup_steps = 5
log_every = 5
[sae]
architecture = "topk"
d_sae = 512
k = 16
TOML
  D=(train --no-progress --store "$WORK/single" --config "$WORK/one.toml")
  "$MASKSAE" "${D[@]}" --out "$WORK/ddp-one" --device cuda
  $TORCHRUN --standalone --nproc-per-node 2 -m masksae "${D[@]}" --out "$WORK/ddp-two" --device cuda --distributed data
  $PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
w = Path(sys.argv[1])
run = next(p.name for p in (w / "ddp-one").iterdir() if p.is_dir())
a, b = load_file(str(w / "ddp-one" / run / "sae.safetensors")), load_file(str(w / "ddp-two" / run / "sae.safetensors"))
err = max(float((a[k] - b[k]).abs().max()) for k in a)
print(("PASS" if err < 1e-3 else "FAIL") + f": DDP over NCCL on 2 GPUs close to one process (max abs diff {err:.2e})")
sys.exit(0 if err < 1e-3 else 1)
PYEOF
else
  echo "SKIP: DDP over NCCL needs 2 GPUs (NCCL refuses two ranks on one device)"
fi
echo "== distributed GPU check done"
