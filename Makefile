# Two entry points: `make run` (a local proxy with demo backends) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench setup

# The hot-path modules are compiled in place by mypyc (setup.py): editing one rebuilds.
HOT_PATH := $(shell sed -n 's/^    "\(meshproxy\/.*\.py\)",$$/\1/p' setup.py)

$(BIN)/meshproxy: pyproject.toml setup.py $(HOT_PATH)
	@# mypyc needs a C compiler and Python's headers; without them the hot path stays Python.
	-@command -v cc >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq gcc libc6-dev)
	-@$(PYTHON) -c "import pathlib, sys, sysconfig; \
		sys.exit(not pathlib.Path(sysconfig.get_paths()['include'], 'Python.h').exists())" \
		|| (apt-get update -qq && apt-get install -y -qq python3-dev)
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
