"""The one list of modules mypyc compiles, and how this installation runs them.

`COMPILED_MODULES` is read by setup.py (what to compile), by the Makefile (what to rebuild
after an edit: `python meshproxy/build_info.py` prints the source paths) and by
`meshproxy/__init__.py` (what to load from source when MESHPROXY_PURE_PYTHON=1). The list holds
only code that runs for every request: the HTTP/1.1 path, HTTP/2 both ways, and the
middlewares whose cost the chain benchmark measures. This module imports nothing from
meshproxy: setup.py runs it before the package is installed.
"""

from __future__ import annotations

import importlib
import os
import sysconfig
from pathlib import Path

COMPILED_MODULES = (
    "meshproxy.http.fields",
    "meshproxy.http.request",
    "meshproxy.http.exchange",
    "meshproxy.http.server",
    "meshproxy.http.upstream",
    "meshproxy.runtime.dispatch",
    "meshproxy.balancer.http_services",
    "meshproxy.observability.metrics",
    "meshproxy.middlewares.retry",
    "meshproxy.middlewares.rate_limit",
    "meshproxy.middlewares.circuit_breaker",
    # HTTP/2 both ways (the h2c front and the h2c pool): per stream and per frame
    "meshproxy.http2.server",
    "meshproxy.http2.server_fields",
    "meshproxy.http2.hpack_memo",
    "meshproxy.http2.upstream",
)
HOT_PATH_MODULES = COMPILED_MODULES  # the name the rest of the code knows
# Third-party packages compiled in place by Cython at setup (meshproxy/http2/cython_build.py):
# the HTTP/2 libraries, most of an HTTP/2 request's cost when interpreted.
ACCELERATED_LIBRARIES = ("h2", "hpack", "hyperframe")

# Set at install time, no C extension is built; set at run time, the compiled extensions that
# are installed are ignored and the same modules load from their .py sources (CI runs the
# suite both ways; see meshproxy/__init__.py).
PURE_PYTHON_ENV = "MESHPROXY_PURE_PYTHON"


def pure_python_requested() -> bool:
    return os.environ.get(PURE_PYTHON_ENV) == "1"


def source_paths() -> list[str]:
    """The compiled modules' sources, relative to the repository root (setup.py, Makefile)."""
    return [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]


def hot_path_state() -> str:
    """ "compiled", "interpreted", or "stale" (compiled from sources edited since: rebuild
    with `make setup`, or set MESHPROXY_PURE_PYTHON=1). A partly compiled hot path is
    "stale" too: some module's extension failed to build or load."""
    compiled = 0
    # An installed wheel's files all get the time of installation, in no particular order:
    # only a source tree (an editable install, where sources are edited) can be stale.
    installed = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    for name in COMPILED_MODULES:
        path = Path(importlib.import_module(name).__file__ or "")
        if path.suffix == ".py":
            continue
        compiled += 1
        if installed.intersection(path.resolve().parents):
            continue
        source = path.with_name(path.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > path.stat().st_mtime:
            return "stale"
    if compiled == 0:
        return "interpreted"
    return "compiled" if compiled == len(COMPILED_MODULES) else "stale"


if __name__ == "__main__":
    print(" ".join(source_paths()))
