# Two commands matter: `make demo` and `make test`. Both install first if needed.
SHELL := /bin/bash
PY ?= python3
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast test-prereqs lint typecheck clean

install: $(VENV)/.installed

$(UV):
	$(PY) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==0.13.9

$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

demo: install
	$(BIN)/persona demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# What the tests talk to outside the venv: installs Prometheus (Debian package, as root) and starts the local
# PostgreSQL when it is installed but stopped, or stops with the one command to run (devtools/test_prereqs.py).
test-prereqs:
	$(PY) devtools/test_prereqs.py

# All tests, the slow end-to-end ones included (CI runs this).
test: install test-prereqs lint typecheck
	$(BIN)/pytest -m "" -q

# The default quick loop: no slow end-to-end tests.
test-fast: install test-prereqs
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
