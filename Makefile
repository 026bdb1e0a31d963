# The two commands of the README. Both create .venv/ when it is missing and install the project
# into it (again only when pyproject.toml changed), so each is safe to run twice.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc.yaml runs `python ...`: it must be the environment's interpreter
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test setup
repro: setup
	dvc repro

test: setup
	ruff check .
	pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)
