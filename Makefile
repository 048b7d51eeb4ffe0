# Two commands for a fresh clone (see README):
#   make demo   set up the environment and run the main job on embedded defaults
#   make test   set up the environment and run the fast test suite
# The virtual environment is a cache: it is (re)built whenever the lock file or pyproject change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.eqdiff-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint bench-tiny clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/eqdiff demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
