# tunnelgate: `make demo` runs the tunnel on loopback, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-without-uvloop lint typecheck pytest pytest-uvloop bench soak fuzz fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fast,dev,fleet]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunnelgate demo

test: lint typecheck pytest pytest-uvloop

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench fuzz
	$(VENV)/bin/ruff format --check src tests bench fuzz

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The in-process tests again on uvloop (the CLI in subprocesses uses it already),
# with plain channels on the relay's copy path (splice runs in every other pass).
pytest-uvloop: $(STAMP)
	TUNNELGATE_LOOP=uvloop TUNNELGATE_NO_SPLICE=1 $(PY) -m pytest -q tests/test_transport.py tests/test_channel.py tests/test_relay.py tests/test_gateway_pool.py tests/test_faultkit.py tests/test_tunnel_*.py

# Every test once more where uvloop is not installed (CI runs this after `make test`).
STOCK_VENV := .venv-stock
$(STOCK_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(STOCK_VENV)
	$(STOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(STOCK_VENV)/bin/python -m pip install --quiet -e '.[dev,fleet]'
	touch $@

test-without-uvloop: $(STOCK_VENV)/.installed
	$(STOCK_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('uvloop') is not None)"
	$(STOCK_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Loopback benchmark against direct and ssh -R (not part of `make test`); see docs/PERFORMANCE.md.
# make bench BENCH_ARGS=--quick   for a smoke run; bench/bench.py --help for the options.
bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/fleet.py $(findstring --quick,$(BENCH_ARGS))
	$(PY) bench/scrape.py

# Mixed traffic against a real gateway and agent while faults fire at random (not part of
# `make test`): SOAK_SECONDS (default 300) of it, then a table and PASS or FAIL.
# make soak SOAK_ARGS='--seed 1234'   replays the faults of an earlier run; tests/soak.py --help.
soak: $(STAMP)
	$(PY) tests/soak.py $(SOAK_ARGS)

# Coverage-guided fuzzing (atheris) of every parser of network or user input (not part of
# `make test`, which replays the corpus kept in fuzz/corpus/): FUZZ_SECONDS (default 60) per
# target, then each corpus is minimised; crashes land in fuzz/crashes/ and in the corpus.
# make fuzz FUZZ_TARGETS=frames,handshake FUZZ_SECONDS=600   see fuzz/campaign.py and fuzz/run.py.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
$(VENV)/.installed-fuzz: $(STAMP)
	$(PY) -m pip install --quiet -e '.[fuzz]'
	touch $@

fuzz: $(VENV)/.installed-fuzz
	$(PY) fuzz/campaign.py --seconds $(FUZZ_SECONDS) --targets '$(FUZZ_TARGETS)'

fmt: $(STAMP)
	$(VENV)/bin/ruff format src tests bench fuzz
	$(VENV)/bin/ruff check --fix src tests bench fuzz

clean:
	rm -rf $(VENV) $(STOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
