# tunnelgate: `make demo` runs the tunnel on loopback, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest pytest-uvloop fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fast,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunnelgate demo

test: lint typecheck pytest pytest-uvloop

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The in-process tests again on uvloop (the CLI in subprocesses uses it already).
pytest-uvloop: $(STAMP)
	TUNNELGATE_LOOP=uvloop $(PY) -m pytest -q tests/test_transport.py tests/test_tunnel_*.py

fmt: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
