# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   set up, then run the service on the demo model and show results
#   make test   set up, then run the whole test suite
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo test lint bench browser-deps

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[serve,dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/lens demo

test: $(BIN)/.installed
	$(BIN)/pytest

# Style, types, the layering contracts (pyproject's [tool.importlinter]) and declared vs
# imported dependencies.
lint: $(BIN)/.installed
	$(BIN)/ruff check app workers tests bench
	$(BIN)/ruff format --check app workers tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/deptry .

bench: $(BIN)/.installed
	$(BIN)/python -m bench

# Headless Chromium for the dashboard test (skipped when absent). Needs root and apt.
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
