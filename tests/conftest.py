from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

# Imported before any test module: with MESHPROXY_PURE_PYTHON=1 its import finder must be in
# place before a test imports h2, hpack or hyperframe, or their compiled modules would load.
import meshproxy  # noqa: F401
from tests.helpers import Backend, ProxyProcess, ScriptedBackend


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Any]]:
    started: list[Backend] = []

    async def make(name: str = "b") -> Backend:
        backend = await Backend(name).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Any]]:
    started: list[ScriptedBackend] = []

    async def make(name: str = "scripted") -> ScriptedBackend:
        backend = await ScriptedBackend(name).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.release()
        backend.close()


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[ProxyProcess] = []

    async def make(dynamic: dict[str, Any] | None = None, **kwargs: Any) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path, dynamic, **kwargs)
        started.append(proxy)
        await proxy.start(wait_config=kwargs.get("provider", "file") == "file")
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
