# The two commands of the README. Both create .venv/ when it is missing and install the project
# into it (again only when pyproject.toml changed), so each is safe to run twice.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc.yaml runs `python ...`: it must be the environment's interpreter
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test setup postgres mutation
repro: setup
	dvc repro

# the layering contracts (pyproject.toml), the tests on both cores, then the CI profile (ci.overrides in
# params.yaml) twice at once in fresh copies (one torch thread each): no regression against
# ci/baseline.json, identical metrics both times, and the comparison notebook runs on its results
test: setup postgres
	ruff check .
	lint-imports
	pytest -q -n 2 --dist worksteal
	python -m mdkat.ci run --out .ci-runs/first --out .ci-runs/second
	python -m mdkat.ci check --now .ci-runs/first --repeat .ci-runs/second
	python -m mdkat.ci notebook --project .ci-runs/first

# not part of `make test`: hours on 2 cores. Each core module mutated against its own tests, in a copy of
# the project; the report goes to reports/mutation/ (ONLY=metrics,align to run some; SAMPLE=0.1 to run a
# seeded tenth of each module's mutants, an estimate with its 95 % interval)
mutation: setup
	python -m tests.mutation --out reports/mutation $(if $(ONLY),--only $(ONLY)) $(if $(SAMPLE),--sample $(SAMPLE))

setup: $(STAMP)

# the PostgreSQL server that the scale-out tests start on loopback (Debian package; the tests run it as the
# `postgres` user when they run as root): installed when missing, with apt-get when we are root
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL server missing: sudo apt-get install postgresql" >&2; exit 1; fi; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)
