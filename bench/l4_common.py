"""What the L4 benchmarks (TCP, TLS, UDP) share: a TCP echo server and a bare uvloop TCP relay
run as subprocesses, and the results file with one section per benchmark.

bench/results/tcp.md holds two benchmarks (bulk throughput and short connections): each run
rewrites only its own section, between `<!-- bench:NAME -->` markers, and writes its raw
numbers to bench/results/NAME-<when>.json.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_tcp_echo(port: int) -> None:
    """Echoes every byte back; closes when the client closes (uvloop, one process)."""
    import uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

        def eof_received(self) -> bool:
            return False  # close our side too

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


def run_tcp_floor(port: int, upstream: int) -> None:
    """A bare relay (about 40 lines): each client connection gets one upstream connection and
    bytes are forwarded as they come, with flow control; no routing, timeouts or metrics.
    What a Python proxy on uvloop cannot go below. Used for bulk throughput only: under
    thousands of short connections per second this relay has aborted uvloop 0.23 with
    "double free or corruption" (glibc) two runs out of two, while meshproxy's pipe ran clean."""
    import uvloop

    class Side(asyncio.Protocol):
        def __init__(self) -> None:
            self.peer: Side | None = None
            self.transport: Any = None
            self.pending: list[bytes] = []

        def other(self) -> Any:
            """The peer's transport while it is open (None before it connects, after it
            closes: uvloop must not be called on a closed transport)."""
            peer = self.peer
            if peer is None or peer.transport is None or peer.transport.is_closing():
                return None
            return peer.transport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            other = self.other()
            if other is not None:
                other.write(data)
            elif self.peer is not None and self.peer.transport is None:
                self.pending.append(data)

        def eof_received(self) -> bool:
            other = self.other()
            if other is not None:
                other.write_eof()
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            other = self.other()
            if other is not None:
                other.close()

        def pause_writing(self) -> None:
            other = self.other()
            if other is not None:
                other.pause_reading()

        def resume_writing(self) -> None:
            other = self.other()
            if other is not None:
                other.resume_reading()

    class Client(Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.peer = Side()
            self.peer.peer = self
            asyncio.get_running_loop().create_task(self.dial(self.peer))

        async def dial(self, up: Side) -> None:
            loop = asyncio.get_running_loop()
            try:
                await loop.create_connection(lambda: up, "127.0.0.1", upstream)
            except OSError:
                self.transport.abort()
                return
            if self.transport.is_closing():
                up.transport.close()
                return
            for data in self.pending:
                up.transport.write(data)
            self.pending.clear()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Client, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


def paired(results: list[dict[str, float]], peers: list[dict[str, float]], key: str) -> list[float]:
    """Per-round ratios result/peer for `key` (rounds measured back to back, paired)."""
    return [r[key] / p[key] for r, p in zip(results, peers, strict=True)]


def spread(values: list[float]) -> str:
    """`median (min-max)` of a list of per-round values, for the tables."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def save_section(md_name: str, bench: str, report: dict[str, Any], lines: list[str]) -> None:
    """Raw numbers to bench/results/<bench>-<when>.json; the table replaces this benchmark's
    section of bench/results/<md_name>.md (other sections are kept); the table is printed."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{bench}-{report['when']}.json").write_text(json.dumps(report, indent=2) + "\n")
    begin, end = f"<!-- bench:{bench} -->", f"<!-- /bench:{bench} -->"
    section = begin + "\n" + "\n".join(lines) + "\n" + end
    path = RESULTS / f"{md_name}.md"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)
    print("\n".join(lines))
