# DeepGMMSegment: `make demo` segments the bundled sample, `make test` runs the whole test suite.
# Both create ./.venv on first use and re-install only when pyproject.toml changes (stamp files).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Prefer python3.11 (the version the torch wheel is pinned for); fall back to python3.
BOOTSTRAP_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3)
# The CPU build; installing it before the package keeps pip from resolving a CUDA build of torch.
TORCH_REQUIREMENT := torch==2.13.0

BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
EVAL_STAMP := $(VENV)/.installed-eval

SAMPLE_T1 := data/sample/mni152_2009_t1_2mm.nii.gz
SAMPLE_MASK := data/sample/mni152_2009_brainmask_2mm.nii.gz
OUT := out
# `make demo METHOD=em-gmm` gives a quick classic-EM run instead of the default deepSVG fit.
METHOD ?= deepsvg

.PHONY: help demo test benchmark stress evaluate clean distclean

help:
	@echo "make demo       create .venv, install, segment the bundled MNI152 sample into $(OUT)/ (METHOD=em-gmm: quick)"
	@echo "make test       create .venv with the test extras and run the whole pytest suite"
	@echo "make benchmark  engine benchmark (EM vs scikit-learn, deep fits before/after, scaling) -> docs/benchmarks.md (QUICK=1: smoke run)"
	@echo "make stress     randomized stress benchmark: 320 phantoms, our 4 methods vs scikit-learn -> docs/robustness.md (long; QUICK=1: 12 cases)"
	@echo "make evaluate   ours vs scikit-learn, ANTs Atropos, SimpleITK on MNI152, then the cardiac phantom -> docs/evaluation.md (~31-39 min in all on 2 float32 cores, ~6-8 of it the cardiac section; QUICK=1 smoke run)"
	@echo "make clean      remove $(OUT)/, build artefacts and caches (keeps .venv)"
	@echo "make distclean  clean, and remove .venv"

$(PY):
	@test -n "$(BOOTSTRAP_PYTHON)" || { echo "error: no python3.11 or python3 on PATH; install Python >= 3.10" >&2; exit 1; }
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_REQUIREMENT)"
	$(PIP) install --quiet -e .
	@touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_REQUIREMENT)"
	$(PIP) install --quiet -e ".[test]"
	@touch $@ $(BASE_STAMP)

demo: $(BASE_STAMP)
	@mkdir -p $(OUT)
	$(VENV)/bin/deepgmm-segment $(SAMPLE_T1) --mask $(SAMPLE_MASK) \
		--classes 3 --method $(METHOD) \
		--output $(OUT)/mni152_labels.nii.gz \
		--probabilities $(OUT)/mni152_probabilities.nii.gz \
		--preview $(OUT)/mni152_preview.png
	@echo "demo: wrote $(OUT)/mni152_labels.nii.gz (1 = CSF, 2 = grey matter, 3 = white matter)," \
		"$(OUT)/mni152_probabilities.nii.gz and $(OUT)/mni152_preview.png"

test: $(TEST_STAMP)
	$(PY) -m pytest

# Needs the eval extras (scikit-learn, scipy, matplotlib for the scaling plot). Sequential, about
# 20-25 min on 2 cores (most of it the baseline engine's 1 mm fit); QUICK=1: tiny inputs, every code path, into out/benchmark-quick/.
benchmark: $(EVAL_STAMP)
	$(PY) benchmarks/bench_engine.py $(if $(QUICK),--quick)

# From scratch (--fresh): every case and method again, then docs/robustness.md. An interrupted run
# resumes with `$(PY) benchmarks/stress.py` (no --fresh). QUICK=1: 12 cases into out/stress-quick/.
stress: $(TEST_STAMP)
	$(PY) benchmarks/stress.py --fresh $(if $(QUICK),--quick)

$(EVAL_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_REQUIREMENT)"
	$(PIP) install --quiet -e ".[eval]"
	@touch $@ $(BASE_STAMP)

# Every method on every condition, each in a process of its own (evaluation/job_server.py), then the cardiac phantom section
# (evaluation/cardiac_run.py); regenerates docs/evaluation.md and docs/images/evaluation-*.png.
# QUICK=1: 2 mm, two conditions, 2 cardiac cases (trained rows: 3 patients, 1 test, 2 epochs), into out/evaluation-quick/.
evaluate: $(EVAL_STAMP)
	$(PY) -m evaluation.run $(if $(QUICK),--quick)

clean:
	rm -rf $(OUT) build dist .pytest_cache *.egg-info DeepGMMSegment/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
