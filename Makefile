# The two commands of the README: `make demo` runs the daemon on a sandboxed user manager,
# `make test` runs every test. Both set up .venv and the Debian packages first.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bootstrapped

.PHONY: demo test lint unit bench install clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh --test
	touch $@

demo: $(STAMP)
	$(BIN)/provenanced demo --scenario

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	$(BIN)/python -m bench

install: $(STAMP)
	$(BIN)/provenanced install --now

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
