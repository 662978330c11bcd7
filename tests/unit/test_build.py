"""The hot path ships compiled (setup.py); a stale or missing build must not go unnoticed.

CI (`make test`) runs the suite twice: compiled, where a build that silently fell back to
Python (no C compiler, a mypyc type error, an extension that failed to build or load) fails
here; and with MESHPROXY_PURE_PYTHON=1, where the same modules load from their sources.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import meshproxy
from meshproxy.build_info import COMPILED_MODULES, hot_path_state, source_paths

ROOT = Path(meshproxy.__file__).resolve().parents[1]


def test_hot_path_runs_compiled_unless_pure_python_was_asked_for():
    """Every listed module is a C extension at least as new as its source, or (asked for)
    every one is Python: anything else is a build that fell back without saying so."""
    expected = "interpreted" if os.environ.get("MESHPROXY_PURE_PYTHON") == "1" else "compiled"
    assert hot_path_state() == expected


def test_version_reports_how_the_hot_path_runs():
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", "version"], capture_output=True, text=True, check=True
    ).stdout
    from meshproxy.http2 import cython_build

    assert out.startswith("meshproxy ") and f"(hot path: {hot_path_state()}, " in out
    assert f"h2: {cython_build.status()})" in out


def test_pure_python_switch_loads_every_compiled_module_from_source():
    """MESHPROXY_PURE_PYTHON=1 at run time: the .py sources, not the extensions beside them,
    and mypyc's shared library is never loaded (so the interpreted CI run tests Python)."""
    probe = (
        "import importlib, sys\n"
        f"names = {list(COMPILED_MODULES)!r}\n"
        "files = [importlib.import_module(n).__file__ for n in names]\n"
        "native = [m for m in sys.modules if 'mypyc' in m]\n"
        "print(all(f.endswith('.py') for f in files), native)\n"
    )
    env = {**os.environ, "MESHPROXY_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.split() == ["True", "[]"], out


def test_one_list_of_compiled_modules():
    """setup.py and the Makefile take the list from build_info; each entry is a real source."""
    assert len(set(COMPILED_MODULES)) == len(COMPILED_MODULES)
    for path in source_paths():
        assert (ROOT / path).is_file(), path
    printed = subprocess.run(
        [sys.executable, str(ROOT / "meshproxy" / "build_info.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert printed == source_paths()
    assert "build_info" in (ROOT / "setup.py").read_text()
    assert "meshproxy/build_info.py" in (ROOT / "Makefile").read_text()


def test_no_exception_name_bound_to_two_types_in_compiled_code():
    """mypyc gives a local one type: `except A as exc` then `except B as exc` in one function
    types `exc` as A, and the B handler raises TypeError when compiled (it did: every malformed
    request, every invalid backend response). Interpreted, nothing shows; so check the source."""
    import ast

    clashes = []
    for path in source_paths():
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            kinds: dict[str, set[str]] = {}
            for sub in ast.walk(node):
                if isinstance(sub, ast.ExceptHandler) and sub.name and sub.type is not None:
                    kinds.setdefault(sub.name, set()).add(ast.unparse(sub.type))
            clashes += [
                f"{path}:{node.name}: {n} {sorted(t)}" for n, t in kinds.items() if len(t) > 1
            ]
    assert not clashes, clashes


def test_http2_libraries_run_compiled_where_cython_was_installed():
    """make setup installs Cython (the `accel` extra) and compiles h2, hpack and hyperframe in
    place (meshproxy/http2/cython_build.py): every module but the skipped ones is then a C
    extension built for the installed version, and loads as one; with MESHPROXY_PURE_PYTHON=1
    the sources load instead, so the interpreted CI pass tests the libraries as published."""
    import importlib.util

    from meshproxy.http2 import cython_build

    if importlib.util.find_spec("Cython") is None:
        assert cython_build.status() in ("interpreted", "compiled")
        return
    import h2.connection

    # this very process too: tests/conftest.py imports meshproxy before any test imports h2
    in_process = h2.connection.__file__ or ""
    assert in_process.endswith(".py" if os.environ.get("MESHPROXY_PURE_PYTHON") == "1" else ".so")
    assert cython_build.status() == "compiled"
    probe = (
        "import meshproxy, h2.connection, hpack.hpack, hyperframe.frame\n"
        "print(*(m.__file__.rsplit('.', 1)[1] for m in"
        " (h2.connection, hpack.hpack, hyperframe.frame)))\n"
    )
    for pure, suffix in (("0", "so"), ("1", "py")):
        env = {**os.environ, "MESHPROXY_PURE_PYTHON": pure}
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
        ).stdout
        assert out.split() == [suffix] * 3, (pure, out)


def test_every_third_party_import_is_a_declared_dependency():
    """A module meshproxy imports must come from a distribution pyproject.toml names in
    [project].dependencies: an install without the test extras (the Docker image) has nothing
    else. (cryptography came with trustme, a test dependency, and the image's proxy could not
    start.)"""
    import ast
    import importlib.metadata
    import re
    import tomllib

    declared = {
        re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
    }
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for path in (ROOT / "meshproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "meshproxy":
                    continue
                candidates = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not candidates & declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, sorted(missing)
