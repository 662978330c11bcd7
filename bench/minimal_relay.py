"""A bare uvloop + httptools keep-alive relay: the floor any Python proxy on this stack pays.

Not a proxy anyone should run (no routing, no header rewriting, no pooling across clients, no
error handling): one upstream connection per client connection, bytes forwarded as they come,
llhttp only checking the framing. The throughput benchmark runs it beside HAProxy and
meshproxy (`--with-floor`) to show how much of the gap is Python itself and how much is
meshproxy's work per request.

    python bench/minimal_relay.py --port 8000 --upstream-port 9000
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()  # type: ignore[union-attr]


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []
        self.dialling: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.dialling = loop.create_task(self.dial(loop))

    async def dial(self, loop: asyncio.AbstractEventLoop) -> None:
        _, self.upstream = await loop.create_connection(
            lambda: Upstream(self), "127.0.0.1", self.upstream_port
        )
        for data in self.pending:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
        self.pending = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
