"""Build hook: compile the per-request modules with mypyc; everything else ships as Python.

The compiled modules are the same typed Python sources (they also run interpreted, with
MESHPROXY_PURE_PYTHON=1 at install or at run time): mypyc turns them into C extensions, which
halves the proxy's own cost per request (bench/hot_path.py). Which modules: the one list in
meshproxy/build_info.py. Which mypyc: pyproject.toml's [build-system] (mypy 2.4; mypyc before
1.19 leaked a reference per `a + b + c` on bytes, tests/unit/test_allocations.py).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
GENERATED = ".mypyc"  # the C sources mypyc writes (git-ignored, disposable)
# build_info imports nothing from meshproxy: read it without installing the package
BUILD_INFO = runpy.run_path(str(ROOT / "meshproxy" / "build_info.py"), run_name="build_info")


def compiled_extensions() -> list:
    if BUILD_INFO["pure_python_requested"]():
        return []
    from mypyc.build import mypycify

    sources = BUILD_INFO["source_paths"]()
    # One group with its shared library inside the package (meshproxy/native__mypyc*.so), so
    # nothing lands at the top level of site-packages.
    extensions = mypycify(
        sources,
        opt_level="3",
        separate=[(sources, "meshproxy.native")],
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
