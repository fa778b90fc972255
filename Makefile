# Two commands matter: `make demo` and `make test`. Both install first if needed.
SHELL := /bin/bash
PY ?= python3
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint typecheck clean

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

# All tests, the slow end-to-end ones included (CI runs this).
test: install lint typecheck
	$(BIN)/pytest -m "" -q

# The default quick loop: no slow end-to-end tests.
test-fast: install
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
