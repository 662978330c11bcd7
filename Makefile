# Two entry points: `make run` (a local proxy with demo backends) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench setup

$(BIN)/meshproxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/meshproxy

run: setup
	$(BIN)/meshproxy local

lint: setup
	$(BIN)/ruff check meshproxy tests bench
	$(BIN)/ruff format --check meshproxy tests bench

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python bench/http_throughput.py
	$(BIN)/python bench/middleware_chain.py
	$(BIN)/python bench/hot_path.py
