"""meshproxy: a per-node service-mesh data plane speaking Traefik's dynamic configuration."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

from meshproxy.build_info import ACCELERATED_LIBRARIES, COMPILED_MODULES, pure_python_requested

__version__ = "0.1.0"


class _SourcesFirst:
    """Import finder for MESHPROXY_PURE_PYTHON=1: the modules mypyc compiled, and the modules
    of the libraries Cython compiled in place (ACCELERATED_LIBRARIES), load from their .py
    files even where the compiled extension sits beside them (Python's own finder would prefer
    the extension), so one installation runs either way (CI runs the suite in both). The
    libraries must be imported after meshproxy for this to apply to them."""

    root = Path(__file__).resolve().parent

    @classmethod
    def find_spec(cls, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name in COMPILED_MODULES:
            source = cls.root.joinpath(*name.split(".")[1:]).with_suffix(".py")
            return importlib.util.spec_from_file_location(name, source)
        if path and name.partition(".")[0] in ACCELERATED_LIBRARIES:
            leaf = name.rpartition(".")[2] + ".py"
            for entry in path:
                source = Path(entry, leaf)
                if source.exists():
                    return importlib.util.spec_from_file_location(name, source)
        return None


if pure_python_requested() and _SourcesFirst not in sys.meta_path:
    sys.meta_path.insert(0, _SourcesFirst)  # type: ignore[arg-type]
