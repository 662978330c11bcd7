"""A bare h2c relay on the `h2` library: the floor any Python HTTP/2 proxy on this stack pays.

Not a proxy anyone should run (no routing, no header rewriting, no flow-control bounds, no
error handling, no timeouts): an h2c server connection (h2, the server configuration
meshproxy/http2/server.py uses) whose streams are forwarded with their fields unchanged to one
backend, over HTTP/1.1 keep-alive connections (httptools parses the answer; one idle
connection per stream in flight, pooled per client connection) or over one h2c connection per
client connection (h2 client side, the h2c pool's configuration). Request bodies are not
relayed (the benchmark sends GETs). bench/h2c_throughput.py runs it beside meshproxy
(`--with-floor`) to show how much of the gap to HAProxy is the library itself and how much is
meshproxy's work per request.

    python bench/minimal_h2_relay.py --port 8000 --upstream-port 9000 [--upstream h1|h2c]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events
import httptools
import uvloop

SERVER_CONFIG = dict(
    header_encoding=None,
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class H1Upstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one stream's request at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.stream_id = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = []
        self.body = []
        method = path = host = b""
        lines = []
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                host = value
            elif not name.startswith(b":"):
                lines.append(name + b": " + value + b"\r\n")
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, path, host)
        self.transport.write(head + b"".join(lines) + b"\r\n")

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = b"%d" % self.parser.get_status_code()
        fields = [(b":status", status)]
        fields += [(n, v) for n, v in self.headers if n not in (b"connection", b"keep-alive")]
        self.client.respond(self.stream_id, fields, b"".join(self.body))
        self.client.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.client.idle:
            self.client.idle.remove(self)

    def eof_received(self) -> None:
        self.transport.close()


class H2Upstream(asyncio.Protocol):
    """One h2c connection per client connection; client stream id -> upstream stream id."""

    def __init__(self, client: Client) -> None:
        self.client = client
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=True,
        )
        self.conn = h2.connection.H2Connection(config)
        self.transport: Any = None
        self.streams: dict[int, list[Any]] = {}  # upstream id -> [client id, fields, body]

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def send(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        upstream_id = self.conn.get_next_available_stream_id()
        self.streams[upstream_id] = [stream_id, None, []]
        self.conn.send_headers(upstream_id, headers, end_stream=True)
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.streams[event.stream_id][1] = event.headers
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id][2].append(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                client_id, fields, body = self.streams.pop(event.stream_id)
                self.client.respond(client_id, list(fields), b"".join(body))
        out = conn.data_to_send()
        if out:
            self.transport.write(out)


class Client(asyncio.Protocol):
    """The h2c server side: one per client connection."""

    def __init__(self, upstream_port: int, upstream: str) -> None:
        self.upstream_port = upstream_port
        self.upstream = upstream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, **SERVER_CONFIG)
        )
        self.transport: Any = None
        self.idle: list[H1Upstream] = []
        self.h2: H2Upstream | None = None
        self.waiting: list[tuple[int, Any]] = []  # streams waiting for the h2c connection
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.forward(event.stream_id, event.headers)
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)

    def forward(self, stream_id: int, headers: Any) -> None:
        if self.upstream == "h2c":
            if self.h2 is not None:
                self.h2.send(stream_id, headers)
                return
            if not self.waiting:
                self.loop.create_task(self.dial_h2())
            self.waiting.append((stream_id, headers))
        elif self.idle:
            self.idle.pop().send(stream_id, headers)
        else:
            self.loop.create_task(self.dial_h1(stream_id, headers))

    async def dial_h1(self, stream_id: int, headers: Any) -> None:
        _, upstream = await self.loop.create_connection(
            lambda: H1Upstream(self), "127.0.0.1", self.upstream_port
        )
        upstream.send(stream_id, headers)

    async def dial_h2(self) -> None:
        _, self.h2 = await self.loop.create_connection(
            lambda: H2Upstream(self), "127.0.0.1", self.upstream_port
        )
        for stream_id, headers in self.waiting:
            self.h2.send(stream_id, headers)
        self.waiting = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for upstream in self.idle:
            upstream.transport.close()
        if self.h2 is not None:
            self.h2.transport.close()

    def respond(self, stream_id: int, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.closed:  # h2load hung up at the end of a run: answers in flight are dropped
            return
        self.conn.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.transport.write(self.conn.data_to_send())


async def serve(port: int, upstream_port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port, upstream), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream", choices=("h1", "h2c"), default="h1")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port, args.upstream))


if __name__ == "__main__":
    main()
