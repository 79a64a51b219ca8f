# Two entry points: `make demo` and `make test`. Both create .venv if needed and install into it.
# torch==2.13.0 is installed first so pip never pulls a multi-GB CUDA build on a CPU machine;
# the package itself asks only for torch>=2.5, so GPU users keep their own CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo demo-quick test bench clean chromium

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

# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
# Installed here when missing and we can (root + apt-get); otherwise those tests skip locally
# (and fail under CI=true, where a skip would hide a broken page).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: /usr/bin/chromium missing and cannot apt-get it: browser tests will skip"; fi; \
	fi

test: $(VENV)/.installed-test chromium
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
