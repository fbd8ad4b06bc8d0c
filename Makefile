# The two commands a fresh clone needs:  make demo   and   make test
# Everything installs into a project-local virtual environment (.venv).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo lint test test-fast test-gpu test-gpu-smoke bench clean

install: $(VENV)/.installed

# The dev extras with vLLM's CUDA build where there is a GPU, its CPU build elsewhere (pyproject.toml).
DEV_EXTRAS ?= $(if $(shell command -v nvidia-smi),dev-gpu,dev)

# torch first, pinned: a CPU-only machine then takes the local CPU wheel, and no dependency's
# looser requirement can pull the multi-GB CUDA build in afterwards.
# vLLM requires torchvision, torchaudio and torchcodec, and the registry's builds of them are CUDA builds:
# beside a CPU torch they fail to import (libc10_cuda.so, libnvrtc), and transformers' and vLLM's imports with
# them. dlray serves text on vLLM and needs none of them, so a CPU install removes them (README: what pip check says then).
# Then DeepSpeed's CPU collectives, compiled once here (~1 min) into this environment rather than at the first
# DeepSpeed run's start (tests/conftest.py points TORCH_EXTENSIONS_DIR at the same directory).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$(DEV_EXTRAS)]'
	if $(BIN)/python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then \
		$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(VENV)/torch_extensions $(BIN)/python -c \
		"from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
		|| echo "DeepSpeed's CPU collectives did not build here (a C++ compiler?): DeepSpeed tries again at its first CPU run"
	touch $@

demo: install        ## train -> export -> serve -> query the CNN on bundled digits (local Ray)
	$(BIN)/python -m dlray.demo

lint: install        ## ruff; mypy checks the strategies against their Protocol, the loop with its Ray-free step and reports, and the config with the family spec
	$(BIN)/ruff check dlray tests
	$(BIN)/mypy -p dlray.strategies -p dlray.config -m dlray.models.family -m dlray.loop -m dlray.step -m dlray.reports

test: lint           ## lint, then the whole suite (CI runs exactly this)
	$(BIN)/pytest -q

test-fast: install   ## skip the end-to-end runs marked slow
	$(BIN)/pytest -q -m "not slow"

# The GPU tier fails (not skips) without a CUDA device; it needs no dev extras beyond pytest (README, "Tests").
test-gpu: install    ## the whole GPU tier (tests/test_gpu.py), ~15-20 min on one H100
	$(BIN)/pytest -q tests/test_gpu.py -m gpu

test-gpu-smoke: install  ## the GPU tier's smoke share: each family, strategy and low precision once, one endpoint; ~5 min
	$(BIN)/pytest -q -x tests/test_gpu.py -m gpu_smoke

bench: install       ## writes benchmarks/results.md
	$(BIN)/dlray bench all

clean:
	rm -rf runs out .pytest_cache
