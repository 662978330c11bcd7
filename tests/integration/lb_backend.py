"""A real HTTP/1.1 backend that dies, hangs, slows down and recovers on command, for the
load-balancing and health-check tests (asyncio streams, keep-alive, one request at a time per
connection).

`mode` answers ordinary requests:  ok | slow:SECONDS | hang | status:N
`health` answers `health_path`:    ok | status:N | hang | redirect-loop | big | big-chunked | slow:SECONDS
`die()` closes the listening socket and every open connection (connection refused from then
on); `revive()` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class ControlledBackend:
    def __init__(self, name: str, health_path: str = "/health") -> None:
        self.name = name
        self.health_path = health_path
        self.mode = "ok"
        self.health = "ok"
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.served = 0  # ordinary requests answered
        self.health_probes = 0
        self.probe_heads: list[bytes] = []
        self.hung: list[asyncio.Event] = []
        self.head_request = False
        # requests to this path get the connection closed unanswered: what Go's net/http does
        # when a handler panics, a bug on one input of an otherwise healthy server
        self.drop_path = ""
        self.dropped = 0
        self.ssl: ssl.SSLContext | None = None  # set before start(): an HTTPS backend

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> ControlledBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def die(self) -> None:
        """Stop listening and cut every connection: the pod is gone."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def revive(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, ssl=self.ssl
            )

    async def aclose(self) -> None:
        """Stop, end every connection, and let their tasks see it before the loop ends."""
        for event in self.hung:
            event.set()
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)  # one loop turn each: connection_lost, then the tasks

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                method, target_bytes, _ = head.split(b" ", 2)
                target = target_bytes.decode()
                self.head_request = method == b"HEAD"
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if self.drop_path and target.split("?")[0] == self.drop_path:
                    self.dropped += 1
                    return
                if target.split("?")[0] == self.health_path:
                    self.health_probes += 1
                    self.probe_heads.append(head)
                    if not await self._answer(writer, self.health, b"healthy"):
                        return
                else:
                    if not await self._answer(writer, self.mode, self.name.encode()):
                        return
                    self.served += 1
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, mode: str, body: bytes) -> bool:
        """Answer by `mode`; False when the connection must end."""
        if mode == "hang":
            event = asyncio.Event()
            self.hung.append(event)
            await event.wait()
            return False
        if mode.startswith("slow:"):
            await asyncio.sleep(float(mode.split(":")[1]))
        status = 200
        extra = b""
        if mode.startswith("status:"):
            status = int(mode.split(":")[1])
        elif mode == "redirect-loop":
            status = 302
            extra = b"location: " + self.health_path.encode() + b"\r\n"
        elif mode == "big":
            # announces 2 GB and sends a first chunk: a probe must not read it all
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2147483648\r\n\r\n" + b"x" * 65536)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return False
        elif mode == "big-chunked":
            # no length announced: 64 KiB chunks without end, until the probe goes away
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(32768):  # at most 2 GiB
                writer.write(b"10000\r\n" + b"x" * 65536 + b"\r\n")
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            return False
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, b"" if self.head_request else body)
        )
        try:
            await writer.drain()
        except ConnectionError:
            return False
        return True
