"""Fixtures for the differential tests: one recording backend for the session, and one
Traefik + meshproxy pair per dynamic config, started once and shared (see harness.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.differential.harness import (
    Differential,
    RecordingBackend,
    TraefikUnavailable,
    traefik_binary,
)

DifferentialFactory = Callable[..., Differential]


@pytest.fixture(scope="session")
def traefik_bin() -> str:
    """The Traefik binary; the whole differential suite is skipped when it is not installed."""
    try:
        return traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(f"differential tests need real Traefik: {exc}")


@pytest.fixture(scope="session")
def recording_backend(traefik_bin: str) -> Iterator[RecordingBackend]:
    """The one recording backend every pair of the session forwards to."""
    backend = RecordingBackend().start()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def differential(
    recording_backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DifferentialFactory]:
    """`differential(name, make_dynamic, static_flags=())`: a started pair for that config.

    Pairs are cached by `name` for the session (a module's tests share one Traefik and one
    meshproxy per config), and all are stopped at the end. `make_dynamic(backend_url)` returns
    the Traefik dynamic config. The caller picks a name unique to its config.
    """
    pairs: dict[str, Differential] = {}
    # Modules start several pairs from threads: pytest's temporary-directory factory is not
    # thread-safe (it creates and prunes its base directory on first use), so it is set up
    # here and used under a lock.
    tmp_path_factory.getbasetemp()
    mktemp_lock = threading.Lock()

    def make(
        name: str,
        make_dynamic: Callable[[str], dict[str, Any]],
        static_flags: Sequence[str] = (),
        **kwargs: Any,
    ) -> Differential:
        if name not in pairs:
            with mktemp_lock:
                workdir: Path = tmp_path_factory.mktemp(f"diff-{name}")
            pairs[name] = Differential(
                workdir, make_dynamic, static_flags, backend=recording_backend, **kwargs
            ).start()
        return pairs[name]

    yield make
    for pair in pairs.values():
        pair.stop()
