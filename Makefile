# Two entry points: `make demo` and `make test`. Both create .venv if needed and install into it.
# torch==2.13.0 is installed first so pip never pulls a multi-GB CUDA build on a CPU machine;
# the package itself asks only for torch>=2.5, so GPU users keep their own CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo demo-quick test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/spud demo --out runs/demo

demo-quick: $(VENV)/.installed
	$(BIN)/spud demo --quick --out runs/demo-quick

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
