"""How this installation runs its hot path: compiled by mypyc (see setup.py) or as Python."""

from __future__ import annotations

import importlib
from pathlib import Path

HOT_PATH_MODULES = (
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
)


def hot_path_state() -> str:
    """ "compiled", "interpreted", or "stale" (compiled from sources edited since: rebuild
    with `make setup`, or set MESHPROXY_PURE_PYTHON=1 when installing)."""
    compiled = 0
    for name in HOT_PATH_MODULES:
        path = Path(importlib.import_module(name).__file__ or "")
        if path.suffix == ".py":
            continue
        compiled += 1
        source = path.with_name(path.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > path.stat().st_mtime:
            return "stale"
    if compiled == 0:
        return "interpreted"
    return "compiled" if compiled == len(HOT_PATH_MODULES) else "stale"
