# Two set-up commands for a fresh machine (see README.md):
#   make train   create .venv, install torch + moe-vae, train the MNIST founding recipe
#   make test    create .venv, install moe-vae[dev], run ruff, mypy and pytest
#
# Knobs: TORCH (the torch requirement installed first, so pip keeps that build: use e.g.
# TORCH="torch --index-url https://download.pytorch.org/whl/cu128" for a CUDA build),
# CONFIG (the recipe to train), ARGS (dotted overrides, e.g. ARGS="--train.epochs=10"),
# PYTEST_ARGS (extra pytest arguments).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= configs/mnist_seed.yaml
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: train test lint install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=23.1"
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: $(VENV)/.installed
	$(BIN)/moe-vae train --config $(CONFIG) $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	@# DeepSpeed compiles its CPU communication op on first use (minutes, once per install):
	@# build it here, so no timed multi-process test pays for it.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	$(BIN)/python -m pytest $(PYTEST_ARGS)
