"""Compile the installed `h2`, `hpack` and `hyperframe` in place with Cython.

The HTTP/2 libraries are pure Python and, per request, most of meshproxy's HTTP/2 cost
(docs/http2-performance.md). Their own sources, unchanged, compile with Cython (`cythonize -3`,
no annotations) into C extensions that Python's import system prefers to the `.py` files
beside them: the same code, so the same behaviour (the HTTP/2 suites run on it in CI; with
MESHPROXY_PURE_PYTHON=1 the `.py` sources load instead, see meshproxy/__init__.py), about
1.35x faster in `bench/h2_ceiling.py`.

    python -m meshproxy.http2.cython_build            # compile (make setup, the Dockerfile)
    python -m meshproxy.http2.cython_build --status   # compiled / interpreted / stale / partial
    python -m meshproxy.http2.cython_build --remove   # back to the pure-Python packages

Each package gets a marker naming the version compiled: a package upgraded since (pip leaves
the extensions it did not install behind) is "stale", compiled again by the next build and
reported at proxy start-up. Not compiled: the packages' `__init__.py` (tiny) and
`hpack/huffman_table.py` (a generated table on which gcc runs for over fifteen minutes here;
Huffman decoding stays interpreted). Needs Cython (the `accel` extra) and a C compiler;
without them the build says so and the packages stay as they are. Errors: SystemExit with
cythonize's status when a compile fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from meshproxy.build_info import ACCELERATED_LIBRARIES

SKIP = frozenset({"__init__.py", "huffman_table.py"})
MARKER = ".meshproxy-cython"  # holds the package version the extensions were built from


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _sources(directory: Path) -> list[Path]:
    return [path for path in sorted(directory.glob("*.py")) if path.name not in SKIP]


def _extension(source: Path) -> Path | None:
    found = sorted(source.parent.glob(source.stem + ".*.so"))
    return found[0] if found else None


def status() -> str:
    """'compiled' (every module of the three packages), 'interpreted' (none), 'stale' (built
    for another version of a package than the one installed) or 'partial'."""
    compiled = total = 0
    for name in ACCELERATED_LIBRARIES:
        directory = _package_dir(name)
        sources = _sources(directory)
        built = [source for source in sources if _extension(source) is not None]
        total += len(sources)
        compiled += len(built)
        marker = directory / MARKER
        if built and (
            not marker.exists() or marker.read_text().strip() != importlib.metadata.version(name)
        ):
            return "stale"
    if compiled == 0:
        return "interpreted"
    return "compiled" if compiled == total else "partial"


def remove() -> None:
    """Delete the extensions and markers: the packages run as their pure-Python sources."""
    for name in ACCELERATED_LIBRARIES:
        directory = _package_dir(name)
        for source in _sources(directory):
            for path in directory.glob(source.stem + ".*.so"):
                path.unlink()
            source.with_suffix(".c").unlink(missing_ok=True)
        (directory / MARKER).unlink(missing_ok=True)


def build(jobs: int) -> int:
    """Compile every package that is not compiled for its installed version; 0 on success,
    or when Cython is missing (the packages stay pure Python: the build says so)."""
    if importlib.util.find_spec("Cython") is None:
        print("cython_build: Cython is not installed; h2, hpack, hyperframe stay interpreted")
        return 0
    if status() == "compiled":
        print("cython_build: h2, hpack, hyperframe already compiled")
        return 0
    remove()  # nothing of an older build may shadow the installed sources
    for name in ACCELERATED_LIBRARIES:
        directory = _package_dir(name)
        # Compiled in a scratch copy: no generated C in site-packages, and the build does not
        # run where a project's pyproject.toml would be read as its configuration.
        with tempfile.TemporaryDirectory(prefix="meshproxy-cython-") as scratch:
            copy = Path(scratch, name)
            shutil.copytree(directory, copy, ignore=shutil.ignore_patterns("__pycache__"))
            sources = [f"{name}/{path.name}" for path in _sources(copy)]
            command = [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", f"-j{jobs}"]
            done = subprocess.run([*command, *sources], cwd=scratch, check=False)
            if done.returncode != 0:
                return done.returncode
            for built in copy.glob("*.so"):
                shutil.copy2(built, directory / built.name)
        (directory / MARKER).write_text(importlib.metadata.version(name) + "\n")
    print(f"cython_build: {', '.join(ACCELERATED_LIBRARIES)} compiled ({status()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--status", action="store_true", help="print the state and exit")
    parser.add_argument("--remove", action="store_true", help="delete the compiled modules")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.status:
        print(status())
        return 0
    if args.remove:
        remove()
        return 0
    return build(args.jobs)


if __name__ == "__main__":
    raise SystemExit(main())
