# dermnb: one command for the data (make data), one for the main job (make figures), one for all tests (make test).
# Every target sets up .venv on a fresh machine first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the data root: ../shared/dermdata where it exists (this workplace's CI), else ./data (what `make data` fills)
DEFAULT_DATA := $(if $(wildcard ../shared/dermdata),$(abspath ../shared/dermdata),$(abspath data))
export DERMNB_DATA ?= $(DEFAULT_DATA)
DATASETS ?= all
PROFILE ?= quick
FIGS ?=
NBS_PY := $(wildcard nbs/*.py nbs/figures/*.py)

.PHONY: install data data-root figures test test-nbs test-py sync check lab clean-cache readme

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP) ## create .venv and install dermnb with its pinned dependencies

data: $(STAMP) ## download the public datasets into $DERMNB_DATA (DATASETS=isic2018_task1,...); prints the steps for PH2 and Derm7pt
	$(BIN)/dermnb data download --root "$(DERMNB_DATA)" --datasets $(DATASETS)

# the dataset folders the figures read (the layouts of dermnb.data; `dermnb data check` validates their contents)
DATA_DIRS := isic2018_task1 isic2017 isic2019 ph2 derm7pt enhance weights/taef2

data-root: # before any figure starts (and before installing): every dataset folder must be in the data root
	@missing=""; for d in $(DATA_DIRS); do test -d "$(DERMNB_DATA)/$$d" || missing="$$missing $$d"; done; \
	if [ -n "$$missing" ]; then \
	  if [ -d "$(DERMNB_DATA)" ]; then echo "The data root $(DERMNB_DATA) lacks:$$missing. No figure was started."; \
	  else echo "No data root at $(DERMNB_DATA). No figure was started."; fi; \
	  echo "Run:  make data$(if $(filter $(DERMNB_DATA),$(DEFAULT_DATA)),, DERMNB_DATA=$(DERMNB_DATA))"; \
	  echo "  (downloads the public datasets into $(DERMNB_DATA) and prints the registration steps and the"; \
	  echo "   'dermnb data add ph2|derm7pt FILE' commands for PH2 and Derm7pt)"; \
	  echo "or use an existing root:  make figures DERMNB_DATA=/path/to/dermdata"; exit 2; fi

figures: data-root $(STAMP) ## run the paper-figure notebooks (PROFILE=quick|full, FIGS="data_overview ...")
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
