# Two commands matter: `make demo` (the local full-chain demo) and `make test` (the whole suite).
# Each creates its own virtual environment in .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/laneproxy demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache
