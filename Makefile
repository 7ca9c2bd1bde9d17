# The README's two commands: `make main` and `make test`. Each creates the
# virtual environment in .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := qjax tests benchmarks experiments configs

.PHONY: main test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

main: $(STAMP)
	$(PY) -m experiments.formats_demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

test: lint
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/formats.py

clean:
	rm -rf $(VENV)
