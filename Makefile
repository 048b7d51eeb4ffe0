# Two commands for a fresh clone (see README):
#   make demo   set up the environment and run the main job on embedded defaults
#   make test   set up the environment and run the fast test suite
# The virtual environment is a cache: it is (re)built whenever the lock file or pyproject change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.eqdiff-installed
PYTEST_ARGS ?=

.PHONY: setup browser postgres demo test test-all test-operations lint clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)

# Headless Chromium (Debian package) for the `browser` tests: the report screenshot.
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	$(BIN)/eqdiff demo

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not gpu and not cluster and not operations" $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -m "not gpu and not cluster and not operations" $(PYTEST_ARGS)

# PostgreSQL server binaries (Debian package) for the `cluster` tests' Prefect server.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# Operations: a multi-node Ray cluster (`ray start`), PostgreSQL, a Prefect server and moto on
# this machine; interrupted and killed runs, lost Ray workers, a server on all interfaces.
test-operations: $(STAMP) postgres
	$(BIN)/python -m pytest -m "cluster or operations" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
