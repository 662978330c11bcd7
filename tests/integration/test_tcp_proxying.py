"""TCP routers on a real proxy process: relaying, round robin, weighted, ipAllowList, and the
byte pipe's life cycle (sockets and the open-connections gauge released, half-close, resets,
idle timeout, backpressure)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from meshproxy.demo.echo import serve_tcp_echo
from tests.helpers import free_port, start_raw_backend, wait_for


async def tagged_echo(tag: bytes) -> tuple[asyncio.AbstractServer, int]:
    """An echo server that prefixes what it sends back with its tag."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(tag + data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, payload: bytes) -> bytes:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:  # reset before the connect call saw it open (no server)
        return b""
    try:
        writer.write(payload)
        writer.write_eof()
    except OSError:  # the proxy already closed the connection (refused source)
        pass
    try:
        data = await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionResetError:  # closed with our bytes unread: the kernel sends a reset
        data = b""
    writer.close()
    return data


async def test_tcp_router_relays_both_ways_and_balances_connections(proxy_factory):
    a, port_a = await tagged_echo(b"a:")
    b, port_b = await tagged_echo(b"b:")
    tcp_port = free_port()
    config = {
        "tcp": {
            "routers": {
                "echo": {"entryPoints": ["tcp"], "rule": "HostSNI(`*`)", "service": "echo"}
            },
            "services": {
                "echo": {
                    "loadBalancer": {
                        "servers": [
                            {"address": f"127.0.0.1:{port_a}"},
                            {"address": f"127.0.0.1:{port_b}"},
                        ]
                    }
                }
            },
        }
    }
    proxy = await proxy_factory(
        config, entrypoints={"web": f"127.0.0.1:{free_port()}", "tcp": f"127.0.0.1:{tcp_port}"}
    )
    replies = sorted([await exchange(tcp_port, b"hello") for _ in range(4)])
    assert replies == [b"a:hello", b"a:hello", b"b:hello", b"b:hello"]
    big = bytes(range(256)) * 4096  # 1 MiB through the relay, flow control on both sides
    assert (await exchange(tcp_port, big)).replace(b"a:", b"").replace(b"b:", b"") == big
    assert proxy.rawdata()["tcpRouters"]["echo@file"]["status"] == "enabled"
    a.close()
    b.close()


async def test_tcp_ip_allow_list_closes_connections_from_other_sources(proxy_factory):
    echo = await serve_tcp_echo("127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    open_port, closed_port = free_port(), free_port()
    service = {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{echo_port}"}]}}
    config = {
        "tcp": {
            "routers": {
                "open": {
                    "entryPoints": ["open"],
                    "rule": "HostSNI(`*`)",
                    "service": "echo",
                    "middlewares": ["loopback"],
                },
                "closed": {
                    "entryPoints": ["closed"],
                    "rule": "HostSNI(`*`)",
                    "service": "echo",
                    "middlewares": ["pods-only"],
                },
            },
            "middlewares": {
                "loopback": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
                "pods-only": {"ipAllowList": {"sourceRange": ["10.0.0.0/8"]}},
            },
            "services": {"echo": service},
        }
    }
    proxy = await proxy_factory(
        config,
        entrypoints={
            "web": f"127.0.0.1:{free_port()}",
            "open": f"127.0.0.1:{open_port}",
            "closed": f"127.0.0.1:{closed_port}",
        },
    )
    fds = await baseline_fds(proxy)
    assert await exchange(open_port, b"ping") == b"ping"
    assert await exchange(closed_port, b"ping") == b""  # closed without a byte relayed
    await released(proxy, fds, ("open", "closed"))  # refused ones are counted down too
    echo.close()


# ---------------------------------------------------------------- the byte pipe end to end
#
# Issue 9 item 2 / issue 10 item 4: every relayed connection must release both of its sockets
# and its open-connections count when it ends, however it ends.


def tcp_route_config(server_port: int, entrypoint: str = "tcp") -> dict[str, Any]:
    """One `HostSNI(`*`)` TCP router on `entrypoint` to one server on 127.0.0.1."""
    return {
        "tcp": {
            "routers": {"r": {"entryPoints": [entrypoint], "rule": "HostSNI(`*`)", "service": "s"}},
            "services": {
                "s": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{server_port}"}]}}
            },
        }
    }


async def tcp_proxy(proxy_factory: Any, server_port: int, *flags: str) -> tuple[Any, int]:
    """A proxy process with a `tcp` entrypoint routed to `server_port`; returns (proxy, port)."""
    port = free_port()
    proxy = await proxy_factory(
        tcp_route_config(server_port),
        entrypoints={"web": f"127.0.0.1:{free_port()}", "tcp": f"127.0.0.1:{port}"},
        extra_flags=list(flags),
    )
    return proxy, port


def open_connections(proxy: Any, entrypoint: str = "tcp") -> float | None:
    """`traefik_open_connections{entrypoint=...,protocol="TCP"}` (Traefik's gauge and labels,
    pkg/observability/metrics/prometheus.go), None while the series does not exist."""
    for line in proxy.metrics().splitlines():
        if line.startswith("traefik_open_connections{") and f'entrypoint="{entrypoint}"' in line:
            assert 'protocol="TCP"' in line
            return float(line.rsplit(" ", 1)[1])
    return None


def fd_count(proxy: Any) -> int:
    """Open file descriptors of the proxy process (Linux /proc)."""
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


def rss_bytes(proxy: Any) -> int:
    status = Path(f"/proc/{proxy.process.pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


async def baseline_fds(proxy: Any) -> int:
    """The proxy's descriptor count at rest: after an admin request (which opens and closes
    a connection), once two readings agree."""
    proxy.metrics()
    readings = [fd_count(proxy)]

    def settled() -> bool:
        readings.append(fd_count(proxy))
        return readings[-1] == readings[-2]

    await wait_for(settled, 5, "a steady descriptor count")
    return readings[-1]


async def released(proxy: Any, fds: int, entrypoints: tuple[str, ...] = ("tcp",)) -> None:
    """Wait until the gauge of each entrypoint is 0 and the proxy holds no more descriptors
    than `fds`."""
    for name in entrypoints:
        await wait_for(
            lambda n=name: open_connections(proxy, n) == 0, 10, f"{name}: open connections == 0"
        )
    await wait_for(lambda: fd_count(proxy) <= fds, 10, f"descriptor count back to {fds}")


async def test_500_short_connections_release_every_socket_and_the_gauge(proxy_factory):
    """Issue 9 item 2: after 500 short connections (`printf x | nc -N`: send, shut write,
    read the echo until EOF) through a TCP route, `traefik_open_connections` is back at 0 and
    the proxy's descriptors at their baseline: both sockets of each connection are closed
    when both directions are done, not when the garbage collector runs."""
    echo = await serve_tcp_echo("127.0.0.1", 0)
    proxy, port = await tcp_proxy(proxy_factory, echo.sockets[0].getsockname()[1])
    fds = await baseline_fds(proxy)
    limit = asyncio.Semaphore(20)

    async def one(i: int) -> bytes:
        async with limit:
            return await exchange(port, b"x%d" % i)

    replies = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(500))), 60)
    assert replies == [b"x%d" % i for i in range(500)]
    await released(proxy, fds)
    echo.close()


async def test_client_half_close_still_receives_the_reply(proxy_factory):
    """RFC 9293 §3.6 half-close, as Traefik's TCP proxy relays it (CloseWrite on the other
    side): the client sends, shuts its write side, and still receives what the server sends
    after reading that EOF; then both sockets are released."""

    async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        data = await reader.read(-1)  # until the client's EOF, relayed by the proxy
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    server, server_port = await start_raw_backend(count_then_reply)
    proxy, port = await tcp_proxy(proxy_factory, server_port)
    fds = await baseline_fds(proxy)
    assert await exchange(port, b"a" * 100_000) == b"got 100000 bytes"
    await released(proxy, fds)
    server.close()


async def test_server_half_close_keeps_the_client_direction_flowing(proxy_factory):
    """Half-close the other way: the server speaks first and shuts its write side; the client
    reads that and the EOF, then sends, and the server still receives it (the proxy passes the
    FIN on and keeps the client-to-server direction open). Released once both sent EOF."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(b"hello, then EOF")
        writer.write_eof()
        got.set_result(await reader.read(-1))
        writer.close()

    server, server_port = await start_raw_backend(greet_then_listen)
    proxy, port = await tcp_proxy(proxy_factory, server_port)
    fds = await baseline_fds(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(-1), 10) == b"hello, then EOF"
    writer.write(b"late words")
    writer.write_eof()
    assert await asyncio.wait_for(got, 10) == b"late words"
    writer.close()
    await released(proxy, fds)
    server.close()


async def test_server_closing_first_then_client_closing_releases_both(proxy_factory):
    """A server that answers and closes its socket outright: the client gets the answer and
    EOF; when the client closes too, the proxy has released both sockets."""

    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.read(100)
        writer.write(b"bye")
        writer.close()

    server, server_port = await start_raw_backend(answer_and_close)
    proxy, port = await tcp_proxy(proxy_factory, server_port)
    fds = await baseline_fds(proxy)
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.read(-1), 10) == b"bye"
        writer.close()
    await released(proxy, fds)
    server.close()


async def test_refused_backend_closes_the_client_without_relaying(proxy_factory):
    """Traefik's TCP proxy closes the client when the dial fails (pkg/tcp/proxy.go): nothing
    is relayed, and the connection is counted down once."""
    proxy, port = await tcp_proxy(proxy_factory, free_port())  # nothing listens there
    fds = await baseline_fds(proxy)
    for _ in range(20):
        assert await exchange(port, b"anyone?") == b""
    await released(proxy, fds)


async def test_client_leaving_while_the_dial_hangs_cancels_the_dial(proxy_factory):
    """A client that resets while the proxy is still connecting to the server (a server whose
    accept queue is full drops the SYN, so the dial hangs): the dial is cancelled, not left
    to run to its 30 s dialTimeout, and its socket and the client's are released. (A client
    that only shuts its write side keeps its connection: it may wait for the answer.)"""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue; later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(server.getsockname())
        fillers.append(filler)
    proxy, port = await tcp_proxy(proxy_factory, server.getsockname()[1])
    fds = await baseline_fds(proxy)
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello?")
        await wait_for(lambda: open_connections(proxy) == 1, 10, "the connection counted")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await released(proxy, fds)
    for filler in fillers:
        filler.close()
    server.close()


async def test_client_reset_closes_the_server_connection(proxy_factory):
    """A client that resets (SO_LINGER 0, an RST) in mid-stream: the proxy closes the server
    connection (the server reads EOF) and releases both sockets."""
    received = asyncio.Event()
    server_saw_close = asyncio.Event()

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        received.set()
        try:
            await reader.read(-1)
        except ConnectionError:
            pass
        server_saw_close.set()
        writer.close()

    server, server_port = await start_raw_backend(listen)
    proxy, port = await tcp_proxy(proxy_factory, server_port)
    fds = await baseline_fds(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    await asyncio.wait_for(received.wait(), 10)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await asyncio.wait_for(server_saw_close.wait(), 10)
    await released(proxy, fds)
    server.close()


async def test_server_reset_closes_the_client_connection(proxy_factory):
    """The neighbouring case: the server resets; the client's connection ends (EOF or reset)
    with what the server sent before, and both sockets are released."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"partial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server, server_port = await start_raw_backend(reset)
    proxy, port = await tcp_proxy(proxy_factory, server_port)
    fds = await baseline_fds(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    chunks = []
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            chunks.append(chunk)
    assert b"".join(chunks) in (b"", b"partial")
    writer.close()
    await released(proxy, fds)
    server.close()


async def test_idle_timeout_closes_both_connections(proxy_factory):
    """An idle TCP connection is closed on both sides after the entrypoint's
    `transport.respondingTimeouts.idleTimeout` (when set; Traefik sets no deadline on TCP
    routes, meshproxy's unset default is Envoy's 1 h): the client reads EOF, the server
    reads EOF, both sockets are released, and not before the timeout."""
    server_saw_close = asyncio.Event()

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await reader.read(-1)
        server_saw_close.set()
        writer.close()

    server, server_port = await start_raw_backend(echo_once)
    proxy, port = await tcp_proxy(
        proxy_factory, server_port, "--entryPoints.tcp.transport.respondingTimeouts.idleTimeout=1s"
    )
    fds = await baseline_fds(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.read(100), 10) == b"ping"
    idle_since = time.monotonic()
    assert await asyncio.wait_for(reader.read(-1), 10) == b""  # the proxy closed us
    assert time.monotonic() - idle_since >= 0.5  # not at once (1 s, minus scheduling slack)
    await asyncio.wait_for(server_saw_close.wait(), 10)
    writer.close()
    await released(proxy, fds)
    server.close()


async def test_slow_reader_applies_backpressure_to_the_sender(proxy_factory):
    """Flow control (asyncio's pause_writing/resume_writing contract, as Traefik's io.Copy
    blocks): toward a server that does not read, the client's 50 MB stall after the kernel
    and proxy buffers fill, the proxy's memory does not grow by the stream, and once the server
    reads, every byte arrives intact."""
    total = 50 * 1024 * 1024
    start_reading = asyncio.Event()
    received: list[int] = [0]
    done = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await start_reading.wait()
        while chunk := await reader.read(1 << 20):
            assert chunk == b"z" * len(chunk)
            received[0] += len(chunk)
        done.set()
        writer.close()

    server, server_port = await start_raw_backend(slow)
    proxy, port = await tcp_proxy(proxy_factory, server_port)
    fds = await baseline_fds(proxy)
    rss_before = rss_bytes(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"z" * (1 << 20)
    sent = 0
    stalled = False
    while sent < total:
        writer.write(chunk)
        sent += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), 3)  # the proxy reading, or not
        except TimeoutError:
            stalled = True
            break
    assert stalled, "50 MB went into a server that reads nothing: no backpressure"
    assert sent < total
    assert rss_bytes(proxy) - rss_before < 16 * 1024 * 1024
    start_reading.set()
    while sent < total:
        writer.write(chunk)
        sent += len(chunk)
        await asyncio.wait_for(writer.drain(), 30)
    writer.write_eof()
    await asyncio.wait_for(done.wait(), 60)
    assert received[0] == total
    writer.close()
    await released(proxy, fds)
    server.close()


@pytest.mark.skipif(shutil.which("nc") is None, reason="nc (netcat-openbsd) not installed")
async def test_real_nc_through_a_tcp_route(proxy_factory):
    """The issue's own reproduction: `printf x | nc -N 127.0.0.1 PORT` (OpenBSD netcat: -N
    shuts the socket's write side at EOF on stdin) gets its echo, and afterwards the gauge is
    0 and the descriptors at baseline."""
    echo = await serve_tcp_echo("127.0.0.1", 0)
    proxy, port = await tcp_proxy(proxy_factory, echo.sockets[0].getsockname()[1])
    fds = await baseline_fds(proxy)
    for _ in range(5):
        process = await asyncio.create_subprocess_exec(
            "nc", "-N", "127.0.0.1", str(port),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(b"x"), 10)
        assert out == b"x"
    await released(proxy, fds)
    echo.close()
