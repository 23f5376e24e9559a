PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Each `make demo` trains in a fresh directory of its own under runs/ (nothing is
# ever deleted); pass WORKDIR=<dir> to resume or continue a run there.
WORKDIR ?= $(shell mkdir -p runs && d=$$(mktemp -d runs/demo-$$(date +%Y%m%d-%H%M%S)-XXXX) && chmod 755 $$d && echo $$d)
# pytest-xdist workers for `make test` (CI has 2 cores; the suite is CPU-bound,
# so more workers than cores gain nothing). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: demo test test-gpu venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.train --config=configs/default.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal

# The kernels and the embedding gradients on a GPU against float64 references, and
# cuDNN attention against XLA (needs jax with CUDA in $(VENV), e.g.
# `$(PY) -m pip install -e '.[cuda,test]'`); TILE_VARIANTS=name,... adds variants.
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu tests/test_gpu_kernels.py tests/test_embedding.py tests/test_attention.py \
	  --tile-variants='$(TILE_VARIANTS)'

clean:
	rm -rf $(VENV)
