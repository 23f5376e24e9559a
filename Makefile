PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= /tmp/moe_jax_demo
# pytest-xdist workers for `make test` (CI has 2 cores; the suite is CPU-bound,
# so more workers than cores gain nothing). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(WORKDIR)
	$(PY) -m experiments.train --config=configs/default.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV)
