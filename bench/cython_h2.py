"""Cython-compiled copies of h2, hpack and hyperframe, for measuring proposal 1 of
docs/http2-performance.md: the libraries' own sources, unchanged, compiled by `cythonize -3`
(no annotations) into DIR, which a bench puts first on the proxy's path:

    python bench/cython_h2.py /tmp/h2-cython          # needs Cython and a C compiler
    python bench/h2c_throughput.py --variant cy=.:PYTHONPATH=/tmp/h2-cython
    PYTHONPATH=/tmp/h2-cython python bench/h2_ceiling.py

Every module but the packages' `__init__.py` is compiled, except `hpack/huffman_table.py`:
a large generated table on which gcc ran over 15 minutes here (its `decode_huffman` stays
interpreted). Takes a few minutes on two cores. Errors: CalledProcessError if cythonize fails.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = ("h2", "hpack", "hyperframe")
SKIP = {"__init__.py", "huffman_table.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", type=Path, help="directory to build into (replaced)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    target: Path = args.target.resolve()
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    modules = []
    for name in PACKAGES:
        source = Path(importlib.import_module(name).__file__ or "").parent
        shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        modules += [
            str(path.relative_to(target))
            for path in sorted((target / name).glob("*.py"))
            if path.name not in SKIP
        ]
    cythonize = [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", f"-j{args.jobs}"]
    subprocess.run([*cythonize, *modules], cwd=target, check=True)
    built = sorted(str(p.relative_to(target)) for p in target.glob("*/*.so"))
    print(f"{len(built)} modules compiled into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
