"""Graceful shutdown and a DaemonSet-style restart (issue 15 point 3, Traefik's
entryPoints.X.transport.lifeCycle: requestAcceptGraceTimeout, graceTimeOut; docs/workers.md)."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request

from tests.helpers import ProxyProcess, catch_all, request, socket_inodes, wait_for
from tests.integration.test_workers import Load, workers


def ping_status(admin_port: int) -> int:
    """The status of the admin /ping; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ping", timeout=2):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


LIFE_CYCLE = [
    "--entryPoints.web.transport.lifeCycle.requestAcceptGraceTimeout=1s",
    "--entryPoints.web.transport.lifeCycle.graceTimeOut=10s",
]


async def test_rollout_under_load_fails_no_request(backends, proxy_factory, tmp_path):
    """Issue 15 point 3: a new proxy starts on the same ports (SO_REUSEPORT), then the old
    one gets SIGTERM, while a bounded client loop (keep-alive and new-connection requests)
    runs: /ping of the old one goes 503 first (Traefik's ping.terminatingStatusCode), it
    keeps accepting for requestAcceptGraceTimeout, ends keep-alive connections at a request
    boundary (Connection: close, RFC 9112 §9.6), finishes what is in flight: zero failures."""
    a = await backends("a")
    old = await proxy_factory(catch_all(a.url), extra_flags=["--workers=2", *LIFE_CYCLE])
    await wait_for(lambda: [w["generation"] for w in workers(old)] == [1, 1], 15, "old ready")
    load = Load(old.port, keep_alive=2, fresh=2, limit=20000, seconds=90)
    running = asyncio.create_task(load.run())
    await wait_for(lambda: load.done >= 200, 20, "load under way")
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new = ProxyProcess(
        new_dir,
        catch_all(a.url),
        entrypoints=dict(old.entrypoints),
        extra_flags=["--workers=2", *LIFE_CYCLE],
    )
    try:
        await new.start()
        await wait_for(lambda: [w["generation"] for w in workers(new)] == [1, 1], 15, "new ready")
        assert old.process is not None
        old.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        await wait_for(lambda: ping_status(old.admin_port) == 503, 5, "old readiness false")
        before = load.done
        await wait_for(lambda: old.process.poll() is not None, 20, "old proxy exited")
        assert time.monotonic() - started >= 0.9  # it accepted for requestAcceptGraceTimeout
        assert old.process.returncode == 0
        await wait_for(lambda: load.done >= before + 500, 30, "the new proxy serves")
        load.stop()
        await running
        print(f"rollout: {load.done} requests, {load.retried} resent on a new connection")
        assert load.failures == [], load.failures[:5]
        assert load.done >= 700
    finally:
        load.stop()
        new.stop()


async def test_readiness_goes_false_first_and_a_second_sigterm_ends_at_once(
    scripted, proxy_factory
):
    """Issue 15 point 3 and bad input: on SIGTERM /ping answers 503 while an in-flight
    request is held (graceTimeOut 30 s); a second SIGTERM during the grace period ends the
    process at once."""
    backend = await scripted()
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=[
            "--workers=2",
            "--entryPoints.web.transport.lifeCycle.graceTimeOut=30s",
        ],
    )
    await wait_for(lambda: [w["generation"] for w in workers(proxy)] == [1, 1], 15, "ready")
    backend.mode = "hold"
    held = asyncio.create_task(request(proxy.port, host="app.test", timeout=40))
    await wait_for(lambda: backend.holding == 1, 10, "a request in flight")
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: ping_status(proxy.admin_port) == 503, 5, "readiness false")
    assert proxy.process.poll() is None  # the held request keeps it in its grace period
    proxy.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    await wait_for(lambda: proxy.process.poll() is not None, 10, "exit on the second SIGTERM")
    assert time.monotonic() - started < 5
    backend.release()
    held.cancel()


async def test_sigterm_ends_each_protocol_at_its_boundary(scripted, proxy_factory):
    """Issue 15 point 3 in a worker: on SIGTERM an idle keep-alive HTTP/1.1 connection is
    closed, an in-flight HTTP/1.1 request finishes with `Connection: close` (RFC 9112 §9.6),
    an HTTP/2 connection gets GOAWAY(NO_ERROR) and its accepted stream still finishes
    (RFC 9113 §6.8), then the proxy exits 0 before graceTimeOut."""
    import h11

    from tests.helpers import read_response
    from tests.integration.test_h2c_downstream import H2Client

    backend = await scripted()
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=["--workers=2", "--entryPoints.web.transport.lifeCycle.graceTimeOut=30s"],
    )
    await wait_for(lambda: [w["generation"] for w in workers(proxy)] == [1, 1], 15, "ready")
    pids = [w["pid"] for w in workers(proxy)]

    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    idle = h11.Connection(h11.CLIENT)
    idle_writer.write(idle.send(h11.Request(method="GET", target="/", headers=[("Host", "a")])))
    idle_writer.write(idle.send(h11.EndOfMessage()))
    assert (await read_response(idle, idle_reader)).status == 200

    backend.mode = "hold"
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    busy = h11.Connection(h11.CLIENT)
    busy_writer.write(busy.send(h11.Request(method="GET", target="/", headers=[("Host", "a")])))
    busy_writer.write(busy.send(h11.EndOfMessage()))
    async with H2Client(proxy.port) as client:
        client.conn.send_headers(
            1,
            [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")],
            end_stream=True,
        )
        client.send()
        await wait_for(lambda: backend.holding == 2, 10, "two requests in flight")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        # Read the frames raw from here: the h2 library takes GOAWAY as the end of the
        # connection, while RFC 9113 §6.8 lets the streams it accepted finish.
        frames: list[tuple[int, int, int, bytes]] = []
        buffer = b""

        async def until_frame(kind: int, stream: int, flag: int = 0) -> None:
            nonlocal buffer
            while not any(f[0] == kind and f[2] == stream and f[1] & flag == flag for f in frames):
                data = await asyncio.wait_for(client.reader.read(65536), 10)
                assert data, "connection closed"
                buffer += data
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    size = int.from_bytes(buffer[:3], "big")
                    stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    frames.append((buffer[3], buffer[4], stream_id, buffer[9 : 9 + size]))
                    buffer = buffer[9 + size :]

        await until_frame(0x7, 0)  # GOAWAY
        goaway = next(f for f in frames if f[0] == 0x7)[3]
        last_stream = int.from_bytes(goaway[:4], "big") & 0x7FFFFFFF
        assert (last_stream, int.from_bytes(goaway[4:8], "big")) == (1, 0)  # NO_ERROR
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # idle: closed
        # The busy request may sit in the other worker, which gets the supervisor's SIGTERM a
        # moment later: release it only once every worker drains (closed its listener, in the
        # same step as it starts answering `Connection: close`).
        await wait_for(lambda: not any(_listening(pid, proxy.port) for pid in pids), 10, "drain")
        backend.release()
        await until_frame(0x1, 1)  # the response's HEADERS on stream 1
        await until_frame(0x0, 1, 0x1)  # its DATA with END_STREAM
        assert b"".join(f[3] for f in frames if f[0] == 0x0 and f[2] == 1) == b"scripted"
    response = await asyncio.wait_for(read_response(busy, busy_reader), 10)
    assert response.status == 200 and response.headers.get("connection") == "close"
    started = time.monotonic()
    await wait_for(lambda: proxy.process.poll() is not None, 15, "the proxy exits")
    assert proxy.process.returncode == 0 and time.monotonic() - started < 15
    idle_writer.close()
    busy_writer.close()


async def test_sigterm_lets_tcp_routed_connections_run_within_the_grace_period(proxy_factory):
    """Traefik 3.7 (TCPEntryPoint.Shutdown: its connection tracker waits for open TCP
    connections until lifeCycle.graceTimeOut): a TCP-routed connection (a database, a broker)
    keeps flowing after SIGTERM; the process exits once it ends, well before the grace."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"echo:" + line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = {
        "tcp": {
            "routers": {"db": {"entryPoints": ["web"], "rule": "HostSNI(`*`)", "service": "db"}},
            "services": {"db": {"loadBalancer": {"servers": [{"address": address}]}}},
        }
    }
    proxy = await proxy_factory(config, extra_flags=LIFE_CYCLE)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"one\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"echo:one\n"
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: ping_status(proxy.admin_port) in (0, 503), 5, "stopping")
    for word in (b"two", b"three"):  # after the listener's accept grace (1 s) too
        await asyncio.sleep(0.6)
        writer.write(word + b"\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"echo:" + word + b"\n"
    assert proxy.process.poll() is None
    writer.close()
    await wait_for(lambda: proxy.process.poll() is not None, 10, "exit once the connection ended")
    server.close()


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (proc(5): its /proc/PID/fd
    socket inodes against /proc/PID/net/tcp, state 0A = LISTEN); False once it exited."""
    try:
        inodes = socket_inodes(pid)
        with open(f"/proc/{pid}/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
    except OSError:
        return False
    return any(
        row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port and row[9] in inodes
        for row in rows
    )
