# The two commands a fresh clone needs:  make demo   and   make test
# Everything installs into a project-local virtual environment (.venv).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo lint test test-fast test-gpu bench clean

install: $(VENV)/.installed

# torch first, pinned: a CPU-only machine then takes the local CPU wheel, and no dependency's
# looser requirement can pull the multi-GB CUDA build in afterwards.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install        ## train -> export -> serve -> query the CNN on bundled digits (local Ray)
	$(BIN)/python -m dlray.demo

lint: install        ## ruff; mypy checks the strategies against their Protocol, and the loop
	$(BIN)/ruff check dlray tests
	$(BIN)/mypy -p dlray.strategies -m dlray.loop

test: lint           ## lint, then the whole suite (CI runs exactly this)
	$(BIN)/pytest -q

test-fast: install   ## skip the end-to-end runs marked slow
	$(BIN)/pytest -q -m "not slow"

test-gpu: install    ## the GPU tier (tests/test_gpu.py): skipped without CUDA
	$(BIN)/pytest -q -m gpu

bench: install       ## writes benchmarks/results.md
	$(BIN)/dlray bench all

clean:
	rm -rf runs out .pytest_cache
