"""A small, fast HTTP/1.1 "whoami" backend (uvloop + httptools) for demos and benchmarks.

GET /          -> "Hostname: <name>\n" plus the request line and headers it received
GET /bench     -> a fixed 13-byte body (keeps the benchmark about the proxy)
POST /echo     -> the request body back
"""

from __future__ import annotations

import asyncio

import httptools


class WhoamiProtocol(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"  # type: ignore[union-attr]
                b"connection: close\r\n\r\n"
            )
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        if self.url.startswith(b"/bench"):
            body = b"Hello, World!"
        elif self.url.startswith(b"/echo"):
            body = b"".join(self.body)
        else:
            lines = [b"Hostname: " + self.name, method + b" " + self.url + b" HTTP/1.1"]
            lines += [n + b": " + v for n, v in self.headers]
            body = b"\n".join(lines) + b"\n"
        keep = self.parser.should_keep_alive()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n" % (
            len(body),
            b"" if keep else b"connection: close\r\n",
        )
        self.transport.write(head + (b"" if method == b"HEAD" else body))  # type: ignore[union-attr]
        if not keep:
            self.transport.close()  # type: ignore[union-attr]


async def serve_whoami(host: str, port: int, name: str) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: WhoamiProtocol(name), host, port, backlog=4096)


def main() -> None:
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(description="a fast whoami HTTP backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--name", default="whoami")
    args = parser.parse_args()

    async def run() -> None:
        server = await serve_whoami(args.host, args.port, args.name)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


if __name__ == "__main__":
    main()
