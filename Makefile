# dermnb: one command for the main job (make figures), one for all tests (make test).
# Every target sets up .venv on a fresh machine first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DERMNB_DATA ?= $(abspath ../shared/dermdata)
PROFILE ?= quick
FIGS ?=
NBS_PY := $(wildcard nbs/*.py nbs/figures/*.py)

.PHONY: install figures test test-nbs test-py sync check lab clean-cache readme

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP) ## create .venv and install dermnb with its pinned dependencies

figures: $(STAMP) ## run the paper-figure notebooks (PROFILE=quick|full, FIGS="data_overview ...")
	$(BIN)/dermnb figures $(FIGS) --profile $(PROFILE) --out figures

test: $(STAMP) check test-nbs test-py ## every test: sync checks, nbdev_test on all notebooks, pytest

test-nbs: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

test-py: $(STAMP)
	$(BIN)/pytest -q tests

check: $(STAMP) ## notebooks, py:percent pairs, package and README must agree
	$(BIN)/python .ci/check_sync.py

sync: $(STAMP) ## after editing: sync pairs, clean notebooks, export the package, regenerate README
	$(BIN)/jupytext --sync $(NBS_PY) nbs/*.ipynb nbs/figures/*.ipynb
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	$(BIN)/python .ci/make_readme.py

lab: $(STAMP) ## JupyterLab on nbs/ with jupytext pairing (jupytext.toml); --allow-root when run as root (containers)
	$(BIN)/jupyter lab --notebook-dir=nbs $(if $(filter 0,$(shell id -u)),--allow-root,)

readme: $(STAMP) ## regenerate README.md (and its results table) from nbs/index.ipynb and the figure CSVs
	$(BIN)/python .ci/make_readme.py

clean-cache: ## remove cached models and features
	rm -rf "$${DERMNB_CACHE:-$$HOME/.cache/dermnb}"
