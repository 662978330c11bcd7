"""Conversation tests for the HTTP/1.1 server and upstream sides: bytes in, bytes and events out.

The real server connection, dispatcher, router, load balancer, upstream connection and metrics
run over in-memory transports (no sockets, no kernel), as mitmproxy's playbook tests and
uvicorn's mock transports do: a test feeds the client's bytes, reads what the proxy wrote
upstream, feeds the backend's bytes, and reads what reached the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshproxy.http.server import EntryPointSettings, H1ServerConnection, HTTPEntryPoint
from meshproxy.http.upstream import TransportSettings, UpstreamConnection, UpstreamPool
from meshproxy.observability.metrics import RequestMetrics
from meshproxy.runtime.dispatch import make_dispatcher
from meshproxy.runtime.standalone import standalone

BACKEND = "http://127.0.0.1:9"
CATCH_ALL = {
    "http": {
        "routers": {"r": {"entryPoints": ["web"], "service": "s", "rule": "PathPrefix(`/`)"}},
        "services": {"s": {"loadBalancer": {"servers": [{"url": BACKEND}]}}},
    }
}


class MemoryTransport:
    """Just enough of an asyncio transport: records writes, closes and reading state."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.eof_written = False
        self.protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.closed = True

    @property
    def done(self) -> bool:
        """Closed, or lingering after an error answer (write side shut: RFC 9112 §9.6)."""
        return self.closed or self.eof_written

    def take(self) -> bytes:
        """What was written since the last take."""
        data = bytes(self.written)
        self.written.clear()
        return data


@dataclass
class Conversation:
    """One client connection to an entrypoint `web` whose routers send to `BACKEND`, with
    upstream connections on memory transports handed out by the pool."""

    entry: HTTPEntryPoint
    client: H1ServerConnection
    client_transport: MemoryTransport
    pool: UpstreamPool
    metrics: RequestMetrics
    protocol_errors: list[int] = field(default_factory=list)
    upstreams: list[tuple[UpstreamConnection, MemoryTransport]] = field(default_factory=list)

    def send(self, data: bytes) -> bytes:
        """Feed the client's bytes; return what the proxy wrote to the client meanwhile."""
        self.client.data_received(data)
        return self.client_transport.take()

    def add_upstream(self) -> tuple[UpstreamConnection, MemoryTransport]:
        """An idle keep-alive connection to the backend, ready in the pool."""
        conn = UpstreamConnection(self.pool)
        transport = MemoryTransport(("127.0.0.1", 9))
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        self.pool.release(conn)
        self.upstreams.append((conn, transport))
        return conn, transport

    def backend_sends(self, data: bytes, index: int = -1) -> bytes:
        """Feed the backend's bytes on upstream `index`; return what reached the client."""
        self.upstreams[index][0].data_received(data)
        return self.client_transport.take()

    def upstream_received(self, index: int = -1) -> bytes:
        return self.upstreams[index][1].take()

    def entrypoint_requests(self) -> dict[int, int]:
        """Requests recorded on the entrypoint, by status."""
        counts: dict[int, int] = {}
        for (status, *_), hist in self.metrics.entrypoint.items():
            counts[status] = counts.get(status, 0) + hist.count
        return counts


def conversation(
    dynamic: dict[str, Any] | None = None,
    settings: EntryPointSettings | None = None,
    transport: TransportSettings | None = None,
) -> Conversation:
    """Build the real proxy pieces for one client connection (call inside a running loop)."""
    rig = standalone(dynamic or CATCH_ALL, transport=transport)
    metrics, state, manager = rig.metrics, rig.state, rig.manager
    errors: list[int] = []
    entry = HTTPEntryPoint(
        settings or EntryPointSettings(name="web", port=5000),
        make_dispatcher("web", manager, metrics),
        on_protocol_error=errors.append,
    )
    (pool,) = state.pools.values()
    client = entry.protocol_factory()
    client_transport = MemoryTransport(("127.0.0.7", 40000))
    client_transport.protocol = client
    client.connection_made(client_transport)  # type: ignore[arg-type]
    conv = Conversation(entry, client, client_transport, pool, metrics, errors)
    return conv


def head_of(data: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The request or status line and the fields (lower-case names) of the first head."""
    head = data.split(b"\r\n\r\n", 1)[0]
    line, *lines = head.split(b"\r\n")
    fields = {}
    for raw in lines:
        name, _, value = raw.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return line, fields
