# Two commands for a fresh clone (see README):
#   make demo   set up the environment and run the main job on embedded defaults
#   make test   set up the environment and run the fast test suite
# The virtual environment is a cache: it is (re)built whenever the lock file or pyproject change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.eqdiff-installed
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-all lint clean

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
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
