# Every target does its own set-up on a fresh machine: a .venv with the pinned CPU torch wheel
# and this package with its dev extra.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,hf]" torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

# one pytest worker per core (pytest-xdist): the tests are independent, and each runs torch on one thread
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto tests

demo: $(STAMP)
	$(BIN)/python -m dynamo_sampling.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python -m pytest -q benchmarks/test_latency.py --benchmark-only --benchmark-json=benchmarks/results/latency_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
