"""Build hook: compile the per-request modules with mypyc; everything else ships as Python.

The compiled modules are the same typed Python sources (they also run interpreted, e.g. with
MESHPROXY_PURE_PYTHON=1): mypyc turns them into C extensions, which halves the proxy's own
cost per request (bench/hot_path.py). The list holds only code that runs for every request:
the HTTP/1.1 path, and the middlewares whose cost the chain benchmark measures.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

GENERATED = ".mypyc"  # the C sources mypyc writes
HOT_PATH = [
    "meshproxy/http/fields.py",
    "meshproxy/http/request.py",
    "meshproxy/http/exchange.py",
    "meshproxy/http/server.py",
    "meshproxy/http/upstream.py",
    "meshproxy/runtime/dispatch.py",
    "meshproxy/balancer/http_services.py",
    "meshproxy/observability/metrics.py",
    "meshproxy/middlewares/retry.py",
    "meshproxy/middlewares/rate_limit.py",
    "meshproxy/middlewares/circuit_breaker.py",
]


def compiled_extensions() -> list:
    if os.environ.get("MESHPROXY_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    # From scratch every time: when its C files already exist, mypyc (1.13) hands setuptools
    # a shared library without sources, and pip runs this file twice.
    shutil.rmtree(GENERATED, ignore_errors=True)
    # One group with its shared library inside the package (meshproxy/native__mypyc*.so), so
    # nothing lands at the top level of site-packages.
    extensions = mypycify(
        HOT_PATH,
        opt_level="3",
        separate=[(HOT_PATH, "meshproxy.native")],
        target_dir=GENERATED,
    )
    for extension in extensions:
        extension.optional = True  # no C compiler: the package installs as plain Python
    return extensions


try:
    ext_modules = compiled_extensions()
except SystemExit:  # mypyc found a type error: say so, and build the pure-Python package
    print("meshproxy: mypyc could not compile the hot path; it stays Python", file=sys.stderr)
    ext_modules = []
setup(ext_modules=ext_modules)
