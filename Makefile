# Two entry points: `make run` (a local proxy with demo backends) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench setup

# The hot-path modules are compiled in place by mypyc (setup.py): editing one rebuilds. Their
# one list is meshproxy/build_info.py, which prints their source paths.
HOT_PATH := $(shell $(PYTHON) meshproxy/build_info.py)

$(BIN)/meshproxy: pyproject.toml setup.py meshproxy/build_info.py $(HOT_PATH)
	@# mypyc needs a C compiler and Python's headers; without them the hot path stays Python.
	-@command -v cc >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq gcc libc6-dev)
	-@$(PYTHON) -c "import pathlib, sys, sysconfig; \
		sys.exit(not pathlib.Path(sysconfig.get_paths()['include'], 'Python.h').exists())" \
		|| (apt-get update -qq && apt-get install -y -qq python3-dev)
	@# Real HTTP/2 and TLS clients the tests drive: curl (with nghttp2), h2load, openssl.
	-@command -v h2load >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 \
		&& command -v openssl >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq nghttp2-client curl openssl)
	@# Peers the tests and benchmarks drive: HAProxy (PROXY protocol peer, bench peer), promtool
	@# (checks /metrics), headless Chromium (the dashboard test), iperf3 (bench/tcp_throughput).
	-@command -v haproxy >/dev/null 2>&1 && command -v iperf3 >/dev/null 2>&1 \
		&& command -v promtool >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends \
			haproxy iperf3 prometheus chromium)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,accel]'
	@# The HTTP/2 libraries compiled in place by Cython (their own sources: ~1.35x per request)
	$(BIN)/python -m meshproxy.http2.cython_build
	@# mypyc's extensions are optional (the build falls back to Python without a word): say so
	@$(BIN)/python -c "import sys; from meshproxy.build_info import hot_path_state as s, \
		pure_python_requested as p; sys.exit(0 if p() or s() == 'compiled' else \
		'make setup: the hot path is ' + s() + ', not compiled: see pip install -v -e .')"
	touch $@

setup: $(BIN)/meshproxy

run: setup
	$(BIN)/meshproxy local

lint: setup
	$(BIN)/ruff check meshproxy tests bench
	$(BIN)/ruff format --check meshproxy tests bench

# The whole suite runs on the compiled hot path (tests/unit/test_build.py fails if the build
# fell back to Python); then the in-process suites (conversations, allocations, properties)
# run again on the same modules loaded from their .py sources. The end-to-end suites are not
# repeated interpreted: the code they add over the in-process ones (HTTP/2, TLS, UDP, TCP,
# workers) is never compiled, so a second pass would test the same code twice.
# Three pytest workers (pytest-xdist), one test file each at a time (module fixtures such as
# the real Traefik stay in one process): most tests wait on sockets and processes, not CPU.
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile
	MESHPROXY_PURE_PYTHON=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile \
		tests/unit tests/property

bench: setup
	@# matplotlib draws the plots (the `bench` extra; installed alone: no rebuild of the package)
	$(BIN)/pip install -q 'matplotlib>=3.7,<4'
	$(BIN)/python -m bench
	$(BIN)/python bench/hot_path.py
	$(BIN)/python bench/middleware_chain.py
	$(BIN)/python bench/rss.py
	$(BIN)/python bench/idle_connections.py
