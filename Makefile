# Two commands matter: `make demo` and `make test`. Both set everything up first (so does `make lint`).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-postgres lint bench lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/sle demo

# The whole suite, SQLite and PostgreSQL. PostgreSQL cases skip when the server is unreachable,
# unless SLE_REQUIRE_POSTGRES=1 (as .ci/run sets), where they fail.
test: setup
	$(BIN)/python -m pytest

# ruff (lint and format) and mypy on the whole tree, configured in pyproject.toml. All three run even when one
# fails, so one run shows every finding.
lint: setup
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

bench: setup
	$(BIN)/python -m bench.run_all

lock:
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache build dist
