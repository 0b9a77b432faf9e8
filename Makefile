# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint bench-install bench-ingest bench-scaling bench-quality clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any looser range pulls several GB of CUDA packages here
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/scatac-dist demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check scatac_dist tests benchmarks

bench-install: install
	$(PY) -m pip install -q -e ".[bench]"

bench-ingest: bench-install
	$(PY) benchmarks/bench_ingest.py

bench-scaling: bench-install
	$(PY) benchmarks/bench_scaling.py

bench-quality: bench-install
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf out benchmarks/work .pytest_cache
