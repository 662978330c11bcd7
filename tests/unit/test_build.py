"""The hot path ships compiled (setup.py); a stale or missing build must not go unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys

from meshproxy.build_info import hot_path_state


def test_hot_path_runs_compiled_unless_pure_python_was_asked_for():
    expected = "interpreted" if os.environ.get("MESHPROXY_PURE_PYTHON") == "1" else "compiled"
    assert hot_path_state() == expected


def test_version_reports_how_the_hot_path_runs():
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", "version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("meshproxy ") and f"(hot path: {hot_path_state()})" in out
