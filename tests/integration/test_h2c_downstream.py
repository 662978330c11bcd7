"""h2c clients through a real proxy process to HTTP/1.1 backends: curl with prior knowledge
(RFC 9113 §3.3) and with `Upgrade: h2c` (RFC 7540 §3.2), h2load, a client built on the `h2`
library for trailers and RFC 8441 WebSocket, and the `websockets` package as the backend."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from websockets.asyncio.server import ServerConnection, serve
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, TextMessage

from tests.helpers import catch_all, start_raw_backend, wait_for
from tests.integration.test_http_hardening import metric

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("h2load") is None, reason="needs curl, h2load"
)


async def run(
    *args: str, timeout: float = 30, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(
        subprocess.run, list(args), input=stdin, capture_output=True, timeout=timeout, check=False
    )


class H2Client:
    """An HTTP/2 client on one TCP connection, built on h2 (prior knowledge)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[Any] = []

    async def __aenter__(self) -> H2Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn.initiate_connection()
        self.send()
        await self.until(
            lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    def send(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def until(self, condition: Any, timeout: float = 10.0) -> None:
        async def pump() -> None:
            while not condition():
                data = await self.reader.read(65536)
                if not data:
                    raise AssertionError("connection closed")
                self.events += self.conn.receive_data(data)
                self.send()

        await asyncio.wait_for(pump(), timeout)

    def of(self, kind: type, stream_id: int) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and getattr(e, "stream_id", 0) == stream_id
        ]

    def ended(self, stream_id: int) -> bool:
        return bool(
            self.of(h2.events.StreamEnded, stream_id) or self.of(h2.events.StreamReset, stream_id)
        )

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, stream_id))


async def test_curl_prior_knowledge_get_and_post(backends, proxy_factory):
    """RFC 9113 §3.3 (prior knowledge) and §8.1: a GET and a POST with a body reach the
    HTTP/1.1 backend (Host from :authority, X-Forwarded-* as Traefik adds them); the answers
    come back over HTTP/2."""
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    url = f"http://127.0.0.1:{proxy.port}"
    got = await run(
        "curl",
        "-sS",
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        url + "/get",
    )
    assert got.stdout == b"2 200", got.stderr
    got = await run(
        "curl", "-sS", "--http2-prior-knowledge", "--data-binary", "hello h2", url + "/post"
    )
    assert got.returncode == 0 and b"POST /post HTTP/1.1" in got.stdout
    get, post = backend.requests[-2:]
    assert get["method"] == "GET" and post["body"] == b"hello h2"
    headers = dict(post["headers"])
    assert headers["host"] == f"127.0.0.1:{proxy.port}"
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-for"] == "127.0.0.1"
    text = proxy.metrics()
    assert (
        metric(
            text, "traefik_entrypoint_requests_total", code="200", method="POST", protocol="http"
        )
        == 1
    )


async def test_nghttp_with_a_zero_header_table_gets_the_size_update(backends, proxy_factory):
    """RFC 7541 §4.2, RFC 9113 §6.5.3: a client that lowers SETTINGS_HEADER_TABLE_SIZE gets a
    dynamic table size update at the start of the next field block. nghttp2's client states
    the size twice on an upgrade (HTTP2-Settings, then its first SETTINGS frame) and ends the
    connection with COMPRESSION_ERROR when the update is missing (fresh tester F4: hpack
    dropped it on the second, equal assignment). Upgrade and prior knowledge, several
    requests on one connection."""
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    url = f"http://127.0.0.1:{proxy.port}"
    for mode in (["-u"], []):  # an upgrade; without -u, prior knowledge (http:// URLs)
        got = await run(
            "nghttp", "-v", *mode, "--header-table-size=0", url + "/a", url + "/b", url + "/c"
        )
        log = got.stdout.decode()
        assert got.returncode == 0, (mode, log[-2000:])
        assert "COMPRESSION_ERROR" not in log and log.count(":status: 200") == 3, mode


async def test_curl_h2c_upgrade_get_post_and_reuse(backends, proxy_factory):
    """RFC 7540 §3.2 (what `curl --http2` sends): the proxy answers 101 itself, the request
    is stream 1 and is routed; a body sent before the switch reaches the backend; the next
    request reuses the HTTP/2 connection. The backend never sees Upgrade or HTTP2-Settings."""
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    url = f"http://127.0.0.1:{proxy.port}"
    got = await run("curl", "-sv", "--http2", url + "/a", url + "/b")
    assert got.returncode == 0
    log = got.stderr.decode()
    assert "HTTP/1.1 101 Switching Protocols" in log and log.count("< HTTP/2 200") == 2
    assert "Re-using existing connection" in log
    # A request with a body is served as HTTP/1.1, its upgrade ignored (as nghttpx; RFC 7540
    # §3.2 would have the whole body before the preface, which deadlocks with Expect:
    # 100-continue, sent by curl past 1 MiB): small, 64 KiB to 1 MiB, and 2 MB with Expect.
    for size in (13, 65536, 131072, 1_000_000, 2_000_000):
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        got = await run(
            "curl", "-sS", "-m", "30", "-w", "%{http_version}", "--http2",
            "--data-binary", "@-", url + "/post", stdin=body,
        )  # fmt: skip
        assert got.returncode == 0, (size, got.stderr)
        assert got.stdout.endswith(b"1.1"), size
        assert backend.requests[-1]["body"] == body, size
    for request in backend.requests:
        names = {name for name, _ in request["headers"]}
        assert not names & {"upgrade", "http2-settings", "connection"}
    assert backend.connections <= 3


async def test_h2load_many_streams_on_few_connections(backends, proxy_factory):
    """§5.1.1, §5.1.2: h2load multiplexes 10 streams on each of 4 connections (bounded:
    2,000 requests); every request succeeds; the open-connections gauge returns to 0."""
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    got = await run(
        "h2load",
        "-n",
        "2000",
        "-c",
        "4",
        "-m",
        "10",
        f"http://127.0.0.1:{proxy.port}/",
        timeout=120,
    )
    out = got.stdout.decode()
    assert "2000 succeeded, 0 failed, 0 errored" in out, out
    assert "Application protocol: h2c" in out
    await wait_for(
        lambda: (
            metric(proxy.metrics(), "traefik_open_connections", entrypoint="web", protocol="TCP")
            == 0
        ),
        10,
        "connections counted down",
    )


async def test_trailers_both_ways_through_an_http11_backend(proxy_factory):
    """RFC 9110 §6.5 and RFC 9113 §8.1: request trailers (HEADERS after DATA) become chunked
    trailers for a client that sent `te: trailers`, and the backend's chunked trailers come
    back as a trailing HEADERS frame."""
    seen: dict[str, bytes] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"0\r\n")
        body += await reader.readuntil(b"\r\n\r\n")
        seen["head"], seen["body"] = head, body
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
            b"4\r\ndone\r\n0\r\nx-sum: 99\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server, port = await start_raw_backend(handler)
    try:
        proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
        async with H2Client(proxy.port) as client:
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", b"svc.test"),
                (b":path", b"/t"),
                (b"te", b"trailers"),
            ]
            client.conn.send_headers(1, headers)
            client.conn.send_data(1, b"payload")
            client.conn.send_headers(1, [(b"x-checksum", b"7")], end_stream=True)
            client.send()
            await client.until(lambda: client.ended(1))
            assert client.body(1) == b"done"
            (trailers,) = client.of(h2.events.TrailersReceived, 1)
            assert dict(trailers.headers) == {b"x-sum": b"99"}
        assert b"transfer-encoding: chunked" in seen["head"].lower()
        assert seen["body"] == b"7\r\npayload\r\n0\r\nx-checksum: 7\r\n\r\n"
    finally:
        server.close()


async def test_settings_come_from_the_static_configuration(backends, proxy_factory):
    """Traefik's entryPoints.X.http2.maxConcurrentStreams (and our initialWindowSize) are what
    the SETTINGS frame advertises; a stream past the limit is refused (REFUSED_STREAM,
    RFC 9113 §5.1.2, §8.7) while the others are served."""
    backend = await backends()
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=[
            "--entryPoints.web.http2.maxConcurrentStreams=2",
            "--entryPoints.web.http2.initialWindowSize=131072",
        ],
    )
    async with H2Client(proxy.port) as client:
        codes = h2.settings.SettingCodes
        remote = client.conn.remote_settings
        assert remote[codes.MAX_CONCURRENT_STREAMS] == 2
        assert remote[codes.INITIAL_WINDOW_SIZE] == 131072
        assert remote[codes.ENABLE_CONNECT_PROTOCOL] == 1


@pytest.fixture
async def ws_echo():
    """A `websockets` echo backend (HTTP/1.1 only)."""
    seen: dict[str, Any] = {}

    async def handler(ws: ServerConnection) -> None:
        seen["headers"] = ws.request.headers if ws.request else None
        async for message in ws:
            await ws.send(message)

    async with serve(handler, "127.0.0.1", 0, subprotocols=["chat"]) as server:
        port = server.sockets[0].getsockname()[1]  # type: ignore[index]
        yield f"http://127.0.0.1:{port}", seen


async def test_websocket_over_http2_to_an_http11_backend(ws_echo, proxy_factory):
    """RFC 8441: an extended CONNECT (:protocol websocket) on an h2c connection reaches a
    backend that speaks only HTTP/1.1 WebSocket (the `websockets` package, which checks the
    handshake); :status 200, then WebSocket frames both ways over the stream; a plain request
    on the same connection is served meanwhile."""
    url, seen = ws_echo
    proxy = await proxy_factory(catch_all(url))
    async with H2Client(proxy.port) as client:
        client.conn.send_headers(
            1,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"http"),
                (b":authority", b"chat.test"),
                (b":path", b"/chat"),
                (b"sec-websocket-version", b"13"),
                (b"sec-websocket-protocol", b"chat"),
            ],
        )
        client.send()
        await client.until(lambda: client.of(h2.events.ResponseReceived, 1) or client.ended(1))
        (response,) = client.of(h2.events.ResponseReceived, 1)
        fields = dict(response.headers)
        assert fields[b":status"] == b"200" and fields[b"sec-websocket-protocol"] == b"chat"
        # RFC 8441 §5: the stream carries RFC 6455 frames; the client masks its own (wsproto).
        ws = Connection(ConnectionType.CLIENT)  # after the handshake: frames only
        client.conn.send_data(1, ws.send(Message(data="hello over h2")))
        client.send()
        received: list[str] = []

        def echoed() -> bool:
            ws.receive_data(client.body(1)[echoed.offset :])  # type: ignore[attr-defined]
            echoed.offset = len(client.body(1))  # type: ignore[attr-defined]
            received.extend(e.data for e in ws.events() if isinstance(e, TextMessage))
            return bool(received)

        echoed.offset = 0  # type: ignore[attr-defined]
        await client.until(echoed)
        assert received == ["hello over h2"]
        client.conn.send_headers(
            3,
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
            end_stream=True,
        )
        client.send()
        await client.until(lambda: client.ended(3))
        client.conn.send_data(1, ws.send(CloseConnection(code=1000)), end_stream=True)
        client.send()
        await client.until(lambda: client.ended(1))
    assert seen["headers"]["Upgrade"].lower() == "websocket"
    text = proxy.metrics()
    assert metric(text, "traefik_entrypoint_requests_total", protocol="websocket", code="200") == 1


# ---------------------------------------------------------------- against the real Traefik


def test_prior_knowledge_requests_match_real_traefik(tmp_path):
    """Traefik 3.7 serves h2c with prior knowledge on its entrypoints: the same request sent
    with `curl --http2-prior-knowledge` to Traefik and to meshproxy on the same config gets
    the same status, and what reaches the HTTP/1.1 backend has the same request line, Host and
    X-Forwarded-* fields. Two documented differences: a :path with broken percent-encoding is
    a stream reset (PROTOCOL_ERROR) in Go's HTTP/2 server, and a 400 here, as on HTTP/1.1 in
    both (so a gRPC client gets a status, INTERNAL, rather than a transport error); and the
    h2c upgrade, which Traefik ignores."""
    from tests.differential.harness import (
        COMPARED_HEADERS,
        TAG_HEADER,
        Differential,
        TraefikUnavailable,
    )

    try:
        pair = Differential(tmp_path, lambda url: catch_all(url)).start()
    except TraefikUnavailable as exc:
        pytest.skip(f"needs real Traefik: {exc}")
    try:
        ports = {"traefik": pair.traefik.port, "meshproxy": pair.meshproxy.port}  # type: ignore[union-attr]

        def curl(side: str, path: str, tag: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    "curl", "-sS", "--http2-prior-knowledge", "--path-as-is",
                    "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                    "-H", f"{TAG_HEADER}: {tag}",
                    f"http://127.0.0.1:{ports[side]}{path}",
                ],
                capture_output=True, timeout=15, check=False,
            )  # fmt: skip

        seen: dict[str, Any] = {}
        for side in ports:
            tag = f"h2-{side}-get"
            got = curl(side, "/x/y?q=1&r=%2F", tag)
            assert got.stdout == b"2 200", (side, got.stdout, got.stderr)
            request = pair.backend.wait_tag(tag, 10)
            # each proxy listens on its own port, which Host and X-Forwarded-* carry
            fields = {
                h: (request.header(h) or "").replace(str(ports[side]), "PORT")
                for h in COMPARED_HEADERS
            }
            seen[side] = (request.request_line, fields)
        assert seen["traefik"] == seen["meshproxy"], seen
        traefik = curl("traefik", "/a%zz", "h2-traefik-bad")
        assert traefik.returncode == 92 and b"PROTOCOL_ERROR" in traefik.stderr
        assert curl("meshproxy", "/a%zz", "h2-meshproxy-bad").stdout == b"2 400"
        # The other difference: `Upgrade: h2c` (what `curl --http2` sends) is ignored by
        # Traefik (served as HTTP/1.1) and made by meshproxy (101, then HTTP/2).
        versions = {}
        for side, port in ports.items():
            got = subprocess.run(
                ["curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                 f"http://127.0.0.1:{port}/up"],
                capture_output=True, timeout=15, check=False,
            )  # fmt: skip
            versions[side] = got.stdout
        assert versions == {"traefik": b"1.1 200", "meshproxy": b"2 200"}
    finally:
        pair.stop()


async def test_rapid_reset_is_cut_and_the_proxy_keeps_serving(backends, proxy_factory):
    """CVE-2023-44487 through a real proxy: a client opening and resetting streams in a loop
    (bounded: at most 1,000) gets GOAWAY(ENHANCE_YOUR_CALM); a new connection is served."""
    from h2.errors import ErrorCodes

    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    async with H2Client(proxy.port) as client:
        goaway: list[Any] = []
        for index in range(1000):
            sid = 2 * index + 1
            try:
                client.conn.send_headers(sid, headers, end_stream=True)
                client.conn.reset_stream(sid, ErrorCodes.CANCEL)
                client.send()
                await client.writer.drain()
            except (ConnectionError, h2.exceptions.ProtocolError):
                break
            if index % 50 == 49:
                try:
                    data = await asyncio.wait_for(client.reader.read(65536), 0.5)
                except TimeoutError:
                    continue
                if not data:
                    break
                client.events += client.conn.receive_data(data)
                goaway = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
                if goaway:
                    break
        if not goaway:
            await client.until(
                lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
            )
            goaway = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    async with H2Client(proxy.port) as fresh:
        fresh.conn.send_headers(1, headers, end_stream=True)
        fresh.send()
        await fresh.until(lambda: fresh.ended(1))
        (response,) = fresh.of(h2.events.ResponseReceived, 1)
        assert dict(response.headers)[b":status"] == b"200"


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_a_frame_flood_is_cut_while_other_clients_are_served(kind, backends, proxy_factory):
    """CVE-2019-9512 (PING flood) and CVE-2019-9515 (SETTINGS flood) through a real proxy: a
    client that writes cheap frames as fast as it can (and reads the acknowledgements, so
    pause_writing never throttles it) gets GOAWAY(ENHANCE_YOUR_CALM) and is closed, while
    another client's requests keep being answered (the fresh tester saw 3-11 s stalls)."""
    import time

    from h2.errors import ErrorCodes
    from hyperframe.frame import PingFrame, SettingsFrame

    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    frame = (
        PingFrame(0, opaque_data=b"12345678") if kind == "ping" else SettingsFrame(0)
    ).serialize()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    received = bytearray()

    async def read_all() -> bool:
        """True if the proxy's close reset the connection (unread flood bytes in its socket
        make the kernel send RST, which may overtake the GOAWAY)."""
        try:
            while data := await reader.read(65536):
                received.extend(data)
        except ConnectionResetError:
            return True
        return False

    reading = asyncio.ensure_future(read_all())

    async def flood() -> None:
        for _ in range(5000):  # bounded: 5000 x 100 frames at most
            if reading.done():
                return
            try:
                writer.write(frame * 100)
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0)

    flooding = asyncio.ensure_future(flood())
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    latencies = []
    async with H2Client(proxy.port) as victim:
        for index in range(20):
            sid = 2 * index + 1
            started = time.perf_counter()
            victim.conn.send_headers(sid, headers, end_stream=True)
            victim.send()
            await victim.until(lambda sid=sid: victim.ended(sid))
            latencies.append(time.perf_counter() - started)
            (response,) = victim.of(h2.events.ResponseReceived, sid)
            assert dict(response.headers)[b":status"] == b"200"
    was_reset = await asyncio.wait_for(reading, 10)
    await flooding
    writer.close()
    goaway = [f for f in _frames(bytes(received)) if f[0] == 0x7]
    assert goaway or was_reset, "the flooding connection was not cut"
    if goaway:
        assert int.from_bytes(goaway[0][1][4:8], "big") == ErrorCodes.ENHANCE_YOUR_CALM
    assert max(latencies) < 3.0, latencies


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each whole frame in `data`, after the server's preface."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    return frames
