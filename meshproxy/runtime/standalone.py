"""A config manager for one HTTP entrypoint, wired as the daemon wires it, minus the daemon.

For what drives the real per-request code in-process: conversation tests over in-memory
transports, the allocation checks, and the hot-path and idle-memory benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from meshproxy.config.dynamic import decode_dynamic
from meshproxy.http.upstream import TransportSettings
from meshproxy.observability.metrics import RequestMetrics
from meshproxy.runtime.compiler import CompileContext
from meshproxy.runtime.manager import ConfigManager
from meshproxy.runtime.state import RuntimeState


@dataclass
class Standalone:
    """A manager with `dynamic` applied, and the metrics and state it compiled against."""

    manager: ConfigManager
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    state: RuntimeState = field(default_factory=RuntimeState)


def standalone(
    dynamic: dict[str, Any] | bytes,
    entrypoint: str = "web",
    transport: TransportSettings | None = None,
    metrics: RequestMetrics | None = None,
) -> Standalone:
    """Compile `dynamic` (a dict, or JSON/YAML bytes) for the HTTP entrypoint `entrypoint`."""
    metrics = metrics or RequestMetrics()
    state = RuntimeState()
    settings = transport or TransportSettings()

    def context(generation: int) -> CompileContext:
        return CompileContext(
            provider="file",
            http_entrypoints=[entrypoint],
            udp_entrypoints=[],
            default_entrypoints=[entrypoint],
            transport=settings,
            metrics=metrics,
            state=state,
            generation=generation,
        )

    manager = ConfigManager(context)
    data = dynamic if isinstance(dynamic, bytes) else json.dumps(dynamic).encode()
    manager.apply(decode_dynamic(data), "standalone")
    return Standalone(manager, metrics, state)
