# The two set-up commands are `make run` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run test lint typecheck unit bench clean schema

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(BIN)/tessera demo
	$(BIN)/tessera serve --no-migrate

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench: install
	$(BIN)/python bench/delivery.py

clean:
	rm -rf $(VENV) tessera.db tessera.db-shm tessera.db-wal .mypy_cache .ruff_cache .pytest_cache

schema: install
	$(BIN)/python -m schema.export
