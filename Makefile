# Two entry points: `make run` (a local proxy with demo backends) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench setup

# The hot-path modules are compiled in place by mypyc (setup.py): editing one rebuilds.
HOT_PATH := $(shell sed -n 's/^    "\(meshproxy\/.*\.py\)",$$/\1/p' setup.py)

$(BIN)/meshproxy: pyproject.toml setup.py $(HOT_PATH)
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
