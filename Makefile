# make play  - set up .venv and play the default world
# make test  - set up .venv and run the tests
# TORCH_SPEC (and TORCH_PIP_ARGS) pick the torch build installed when .venv has none,
# e.g. make test TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url URL_OF_A_CUDA_INDEX"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin

.PHONY: venv play test bench clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -e .
	touch $@

# the tests' extras (pytest; triton, whose interpreter runs TempCache's GPU kernels on the CPU)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

play: venv
	$(BIN)/python play.py

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m runtime.pacing_bench

clean-venv:
	rm -rf $(VENV)
