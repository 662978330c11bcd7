"""HTTP/1.1 clients through a running proxy to h2c servers (Traefik Mesh's
`mesh.traefik.io/scheme: h2c`): real sockets, a real `meshproxy proxy` process, an HTTP/2
backend built here on the `h2` library, and h11 (an independent implementation) as the client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from tests.helpers import catch_all, read_response, request, wait_for


class H2cBackend:
    """An h2c server (prior knowledge, RFC 9113 §3.3) on the h2 library.

    Each stream is answered by `mode`:
      echo          200; `x-echo-method`, `x-echo-path`, `x-echo-authority` and every request
                    field as `x-echo-field` lines; the request body back (flow-controlled);
                    the request's trailers back as trailers, plus `x-backend-trailer`, when
                    the request carried `te: trailers`
      refuse-first  the first stream of each connection: RST_STREAM(REFUSED_STREAM); then echo
      refuse-six    the first six streams of each connection: REFUSED_STREAM; then echo
      goaway-first  the first stream of the first connection: GOAWAY(last_stream_id=0), close
      hold          echo once `release()` is called
      hold-hang     hold the streams whose path starts with /hang (never answered unless
                    released), echo the others
      goaway-each   the first stream of each connection: 200 and part of the body, then a
                    graceful GOAWAY(last_stream_id=that stream, NO_ERROR), the rest of the
                    body, and the connection closes; the other streams on it are ignored
                    (above last_stream_id: not processed, RFC 9113 §6.8)
      bad-frame     a DATA frame on stream 0 (a connection error, RFC 9113 §6.1)
    """

    def __init__(self, mode: str = "echo", max_streams: int = 100) -> None:
        self.mode = mode
        self.max_streams = max_streams
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self.open_connections: list[_BackendConnection] = []
        self.requests: list[dict[str, Any]] = []
        self.resets: list[int] = []
        self.released = False
        self.peak_streams = 0

    async def start(self) -> H2cBackend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _BackendConnection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"h2c://127.0.0.1:{self.port}"

    def release(self) -> None:
        self.released = True
        for conn in self.open_connections:
            conn.answer_held()

    def held(self) -> int:
        return sum(len(conn.held) for conn in self.open_connections)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in self.open_connections:
            if conn.transport is not None:
                conn.transport.close()


class _BackendConnection(asyncio.Protocol):
    def __init__(self, backend: H2cBackend) -> None:
        self.backend = backend
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.local_settings = Settings(
            client=False,
            initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: backend.max_streams},
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, dict[str, Any]] = {}
        self.outgoing: dict[int, tuple[bytearray, list[tuple[bytes, bytes]] | None]] = {}
        self.held: list[int] = []
        self.first = True
        self.seen = 0
        self.goaway_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.connections += 1
        self.backend.open_connections.append(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.backend.open_connections:
            self.backend.open_connections.remove(self)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()
            assert self.transport is not None
            self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                self.streams[event.stream_id] = {
                    "headers": event.headers,
                    "body": bytearray(),
                    "trailers": None,
                }
                open_now = len(self.streams)
                self.backend.peak_streams = max(self.backend.peak_streams, open_now)
            elif kind is DataReceived:
                self.streams[event.stream_id]["body"] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is TrailersReceived:
                self.streams[event.stream_id]["trailers"] = event.headers
            elif kind is StreamEnded:
                self.on_request(event.stream_id)
            elif kind is StreamReset:
                self.backend.resets.append(event.error_code)
                self.streams.pop(event.stream_id, None)
                self.outgoing.pop(event.stream_id, None)
            elif kind is WindowUpdated:
                for sid in list(self.outgoing):
                    self.send_body(sid)
        self.flush()

    def on_request(self, sid: int) -> None:
        backend = self.backend
        stream = self.streams[sid]
        backend.requests.append(stream)
        first, self.first = self.first, False
        self.seen += 1
        mode = backend.mode
        if (mode == "refuse-first" and first) or (mode == "refuse-six" and self.seen <= 6):
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self.streams.pop(sid)
        elif mode == "goaway-first" and first and backend.connections == 1:
            # raw: h2 refuses to send anything after its own GOAWAY (python-hyper/h2#1181)
            assert self.transport is not None
            self.flush()
            self.transport.write(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
            self.transport.close()
        elif mode == "bad-frame":
            assert self.transport is not None
            self.flush()
            self.transport.write(b"\x00\x00\x02\x00\x00\x00\x00\x00\x00no")
        elif mode == "goaway-each":
            if self.goaway_sent:
                return
            self.goaway_sent = True
            assert self.transport is not None
            self.streams.pop(sid)
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.h2.send_data(sid, b"part1-")
            self.flush()
            # raw: h2 refuses to send anything after its own GOAWAY (python-hyper/h2#1181)
            self.transport.write(GoAwayFrame(0, last_stream_id=sid, error_code=0).serialize())
            self.h2.send_data(sid, b"part2", end_stream=True)
            self.flush()
            self.transport.close()
        elif mode == "hold" and not backend.released:
            self.held.append(sid)
        elif mode == "hold-hang" and not backend.released:
            path = dict(stream["headers"])[b":path"]
            if path.startswith(b"/hang"):
                self.held.append(sid)
            else:
                self.answer(sid)
        else:
            self.answer(sid)

    def answer_held(self) -> None:
        held, self.held = self.held, []
        for sid in held:
            self.answer(sid)
        self.flush()

    def answer(self, sid: int) -> None:
        stream = self.streams.pop(sid)
        fields = stream["headers"]
        pseudo = {n: v for n, v in fields if n.startswith(b":")}
        headers = [
            (b":status", b"200"),
            (b"x-echo-method", pseudo[b":method"]),
            (b"x-echo-path", pseudo[b":path"]),
            (b"x-echo-authority", pseudo.get(b":authority", b"")),
        ]
        headers += [(b"x-echo-field", n + b"=" + v) for n, v in fields if n[:1] != b":"]
        trailers = None
        if (b"te", b"trailers") in fields:
            trailers = [*(stream["trailers"] or []), (b"x-backend-trailer", b"yes")]
        body = bytes(stream["body"])
        self.h2.send_headers(sid, headers, end_stream=not body and trailers is None)
        if body or trailers is not None:
            self.outgoing[sid] = (bytearray(body), trailers)
            self.send_body(sid)

    def send_body(self, sid: int) -> None:
        """What the proxy's windows admit (RFC 9113 §5.2), then the end of the stream."""
        body, trailers = self.outgoing[sid]
        while body:
            size = min(len(body), self.h2.local_flow_control_window(sid), 16384)
            if size <= 0:
                return
            self.h2.send_data(sid, bytes(body[:size]))
            del body[:size]
        del self.outgoing[sid]
        if trailers is not None:
            self.h2.send_headers(sid, trailers, end_stream=True)
        else:
            self.h2.end_stream(sid)


async def raw_request(port: int, data: bytes, method: str = "POST") -> tuple[Any, Any, bytes]:
    """Send `data` as it is; h11 reads the answer: (response, end of message, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        head = None
        chunks = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return head, event, b"".join(chunks)
    finally:
        writer.close()


async def test_headers_and_bodies_cross_from_http1_to_h2c(proxy_factory):
    """Issue 11 acceptance 3 (HTTP/1.1 client -> h2c server): the request arrives as an HTTP/2
    request (RFC 9113 §8.3.1: :authority from Host, :path with the query, no Host or
    hop-by-hop fields, X-Forwarded-For), a 1 MiB body crosses both ways under flow control,
    and the answer reaches the HTTP/1.1 client whole."""
    backend = await H2cBackend().start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        body = bytes(range(256)) * 4096
        response = await request(
            proxy.port,
            "POST",
            "/upload?x=1",
            headers={"Connection": "keep-alive", "Keep-Alive": "timeout=5", "X-Custom": "v"},
            body=body,
            host="grpc.demo.traefik.mesh",
        )
        assert response.status == 200 and response.body == body
        assert response.headers["x-echo-method"] == "POST"
        assert response.headers["x-echo-path"] == "/upload?x=1"
        assert response.headers["x-echo-authority"] == "grpc.demo.traefik.mesh"
        fields = [v for n, v in response.raw_headers if n == b"x-echo-field"]
        names = [f.split(b"=", 1)[0] for f in fields]
        assert b"x-custom=v" in fields and b"x-forwarded-for=127.0.0.1" in fields
        for gone in (b"host", b"connection", b"keep-alive", b"transfer-encoding"):
            assert gone not in names
        assert backend.connections == 1
    finally:
        backend.close()


async def test_chunked_body_and_trailers_both_ways(proxy_factory):
    """RFC 9110 §6.5 and RFC 9112 §7.1.2: a chunked request's trailer section reaches the h2c
    server as a trailing HEADERS frame (with `te: trailers`, RFC 9110 §10.1.4, as gRPC needs);
    the server's trailers reach the client, which sent TE: trailers, in the chunked answer."""
    backend = await H2cBackend().start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        head, end, body = await raw_request(
            proxy.port,
            b"POST /t HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n",
        )
        assert head.status_code == 200 and body == b"hello world"
        assert dict(head.headers).get(b"transfer-encoding") == b"chunked"
        trailers = dict(end.headers)
        assert trailers[b"x-checksum"] == b"42" and trailers[b"x-backend-trailer"] == b"yes"
        (seen,) = backend.requests
        assert seen["trailers"] == [(b"x-checksum", b"42")]
        assert (b"te", b"trailers") in seen["headers"]
    finally:
        backend.close()


async def test_refused_streams_and_goaway_are_sent_again_without_a_retry_middleware(
    proxy_factory,
):
    """Issue 11: a stream refused with REFUSED_STREAM (RFC 9113 §8.7), or above a GOAWAY's
    last_stream_id (§6.8), reached no application: the pool sends it once more, as Go's
    transport does for Traefik (after GOAWAY on a new connection), so a server's graceful
    restart costs the client nothing, with no retry middleware and no retry counted."""
    for mode in ("refuse-first", "goaway-first"):
        backend = await H2cBackend(mode).start()
        try:
            proxy = await proxy_factory(catch_all(backend.url))
            response = await request(proxy.port, "GET", "/again")
            assert response.status == 200, (mode, response)
            assert response.headers["x-echo-path"] == "/again"
            assert len(backend.requests) == 2
            assert backend.connections == (1 if mode == "refuse-first" else 2), mode
            assert "traefik_service_retries_total{" not in proxy.metrics()
        finally:
            backend.close()


async def test_a_stream_refused_six_times_goes_to_retry_or_is_a_502(proxy_factory):
    """Refused on each of the pool's 6 tries (RFC 9113 §8.7 REFUSED_STREAM, sent again with a
    short backoff as Go's transport does), the try ends as "nothing reached the backend": the
    retry middleware sends it again (counted in traefik_service_retries_total, as Traefik
    counts), and without one the client gets 502 (Traefik's status for a backend that could
    not take the request); the next request is served."""
    backend = await H2cBackend("refuse-six").start()
    try:
        dynamic = catch_all(backend.url)
        dynamic["http"]["routers"]["r"]["middlewares"] = ["retry"]
        dynamic["http"]["middlewares"] = {"retry": {"retry": {"attempts": 3}}}
        proxy = await proxy_factory(dynamic)
        response = await request(proxy.port, "GET", "/again")
        assert response.status == 200 and len(backend.requests) == 7
        assert 'traefik_service_retries_total{service="s@file"} 1.0' in proxy.metrics()
    finally:
        backend.close()
    backend = await H2cBackend("refuse-six").start()
    try:
        generation = proxy.generation()
        proxy.write(catch_all(backend.url))
        await wait_for(lambda: proxy.generation() > generation, 10, "reload")
        assert (await request(proxy.port)).status == 502
        assert (await request(proxy.port)).status == 200
    finally:
        backend.close()


async def test_max_concurrent_streams_is_respected_with_a_second_connection(proxy_factory):
    """RFC 9113 §5.1.2: a server allowing one stream at a time never sees two on one
    connection; concurrent requests get another connection."""
    backend = await H2cBackend("hold", max_streams=1).start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        tasks = [asyncio.create_task(request(proxy.port, target=f"/{i}")) for i in range(3)]
        await wait_for(lambda: backend.held() == 3, 10, "three held streams")
        assert backend.connections == 3 and backend.peak_streams == 1
        backend.release()
        responses = await asyncio.gather(*tasks)
        assert sorted(r.headers["x-echo-path"] for r in responses) == ["/0", "/1", "/2"]
    finally:
        backend.close()


async def test_a_backend_sending_a_bad_frame_gets_502_and_a_new_connection(proxy_factory):
    """Issue 11, bad input: a backend that sends a bad frame (DATA on stream 0, RFC 9113 §6.1)
    fails its connection's streams with 502; the proxy drops that connection and the next
    request, once the backend behaves, is served on a new one."""
    backend = await H2cBackend("bad-frame").start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        assert (await request(proxy.port)).status == 502
        backend.mode = "echo"
        assert (await request(proxy.port)).status == 200
        assert backend.connections == 2
    finally:
        backend.close()


async def test_hot_reload_lets_streams_in_flight_finish(proxy_factory):
    """Hot reload (issue 11 acceptance 3, as for HTTP/1.1): streams in flight when the config
    moves the service to another server finish on the old one (its pool drains, it does not
    cut them); new requests go to the new server."""
    old = await H2cBackend("hold").start()
    new = await H2cBackend().start()
    try:
        proxy = await proxy_factory(catch_all(old.url))
        tasks = [asyncio.create_task(request(proxy.port, target=f"/{i}")) for i in range(4)]
        await wait_for(lambda: old.held() == 4, 10, "four held streams")
        generation = proxy.generation()
        proxy.write(catch_all(new.url))
        await wait_for(lambda: proxy.generation() > generation, 10, "reload")
        fresh = await request(proxy.port, target="/fresh")
        assert fresh.status == 200 and len(new.requests) == 1
        old.release()
        responses = await asyncio.gather(*tasks)
        assert [r.status for r in responses] == [200] * 4
        assert sorted(r.headers["x-echo-path"] for r in responses) == ["/0", "/1", "/2", "/3"]
        await wait_for(lambda: not old.open_connections, 10, "old connection closed")
    finally:
        old.close()
        new.close()


async def test_client_leaving_cancels_its_stream(proxy_factory):
    """RFC 9113 §8.7: a client that goes away has its stream reset with CANCEL; the
    connection to the backend stays up for the next request."""
    backend = await H2cBackend("hold").start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /gone HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await wait_for(lambda: backend.held() == 1, 10, "held stream")
        writer.close()
        await wait_for(lambda: backend.resets == [ErrorCodes.CANCEL], 10, "RST_STREAM(CANCEL)")
        backend.mode = "echo"
        assert (await request(proxy.port)).status == 200
        assert backend.connections == 1
    finally:
        backend.close()


async def test_keep_alive_client_gets_many_answers_over_one_upstream_connection(proxy_factory):
    """Few connections per server: 40 requests from 8 concurrent keep-alive clients share one
    HTTP/2 connection to the backend."""
    backend = await H2cBackend().start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))

        async def client(index: int) -> list[int]:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            statuses = []
            try:
                for n in range(5):
                    conn = h11.Connection(h11.CLIENT)
                    writer.write(
                        conn.send(
                            h11.Request(
                                method="GET", target=f"/{index}/{n}", headers=[("Host", "a")]
                            )
                        )
                    )
                    writer.write(conn.send(h11.EndOfMessage()))
                    response = await asyncio.wait_for(read_response(conn, reader), 10)
                    statuses.append(response.status)
            finally:
                writer.close()
            return statuses

        results = await asyncio.gather(*(client(i) for i in range(8)))
        assert all(statuses == [200] * 5 for statuses in results)
        assert backend.connections == 1 and len(backend.requests) == 40
    finally:
        backend.close()


async def test_refused_streams_as_real_traefik_does(tmp_path, proxy_factory):
    """Checked against real Traefik 3.7 (its h2c transport is Go's x/net/http2): a stream
    refused once (REFUSED_STREAM, or above a GOAWAY's last_stream_id) is sent again by the
    transport itself, so with no retry middleware both proxies answer 200 and the backend sees
    the request twice. (Refused again, Go keeps trying, up to 7 times with backoff from 1 s;
    meshproxy up to 6 tries with waits from 50 ms, then leaves it to the retry middleware:
    docs/http2-upstream.md.)"""
    import pytest

    from tests.differential.harness import TraefikProcess, TraefikUnavailable, traefik_binary

    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    for mode in ("refuse-first", "goaway-first"):
        outcomes = {}
        for side in ("traefik", "meshproxy"):
            backend = await H2cBackend(mode).start()
            traefik = None
            try:
                if side == "traefik":
                    workdir = tmp_path / f"{mode}-traefik"
                    workdir.mkdir()
                    traefik = TraefikProcess(workdir, catch_all(backend.url)).start()
                    port = traefik.port
                else:
                    port = (await proxy_factory(catch_all(backend.url))).port
                response = await request(port, "GET", "/twice")
                outcomes[side] = (response.status, len(backend.requests))
            finally:
                if traefik is not None:
                    traefik.stop()
                backend.close()
        assert outcomes["meshproxy"] == outcomes["traefik"] == (200, 2), (mode, outcomes)


async def _run(*command: str, stdin: bytes = b"", timeout: float = 120) -> tuple[int, bytes]:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(stdin), timeout)
    assert process.returncode is not None
    return process.returncode, out


async def test_h2c_both_ways_h2load_and_curl(proxy_factory):
    """HTTP/2 end to end (issue 11, acceptance 2 and 3): h2load's 2,000 requests (bounded),
    10 streams on each of 4 client connections, all succeed and reach the h2c server over one
    multiplexed connection; curl --http2-prior-knowledge gets its POST body echoed."""
    import shutil

    import pytest

    if shutil.which("h2load") is None or shutil.which("curl") is None:
        pytest.skip("needs h2load and curl")
    backend = await H2cBackend().start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        url = f"http://127.0.0.1:{proxy.port}/load"
        code, out = await _run("h2load", "-n", "2000", "-c", "4", "-m", "10", url)
        text = out.decode()
        assert code == 0 and "2000 succeeded, 0 failed, 0 errored" in text, text
        # 40 streams at a time from the clients, one connection to the server: multiplexed
        assert len(backend.requests) == 2000 and backend.connections == 1
        code, out = await _run(
            "curl", "-s", "--http2-prior-knowledge", "--data-binary", "@-", url, stdin=b"x" * 70_000
        )
        assert code == 0 and out == b"x" * 70_000
    finally:
        backend.close()


async def test_one_client_holding_many_streams_does_not_starve_another(proxy_factory):
    """F10 (fresh-h2), issue 11 acceptance 2: a server advertising MAX_CONCURRENT_STREAMS=10
    (RFC 9113 §5.1.2), one HTTP/2 client holding 200 streams the server never answers (as
    long-lived gRPC Watch streams do): the pool opens the 20 connections they need, never
    more than 10 streams on one, as Go's transport (so Traefik) does, and another client's
    request is answered at once, not after 30 s of waiting then 503 (the former bound of 16
    connections per server, shared by every client)."""
    backend = await H2cBackend("hold-hang", max_streams=10).start()
    writer = None
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        hog = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        hog.initiate_connection()
        for index in range(200):
            hog.send_headers(
                hog.get_next_available_stream_id(),
                [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"capped.test"),
                    (b":path", f"/hang/{index}".encode()),
                ],
                end_stream=True,
            )
        writer.write(hog.data_to_send())

        async def hold_all() -> bool:
            # keep the hog's connection served (SETTINGS acks) while the proxy dials
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.05)
            except TimeoutError:
                data = b""
            if data:
                hog.receive_data(data)
                writer.write(hog.data_to_send())
            return backend.held() == 200

        await wait_for(hold_all, 30, "200 held streams")
        assert backend.connections == 20 and backend.peak_streams == 10
        loop = asyncio.get_running_loop()
        started = loop.time()
        fast = await asyncio.wait_for(request(proxy.port, target="/fast"), 10)
        assert fast.status == 200 and fast.headers["x-echo-path"] == "/fast"
        assert loop.time() - started < 5
    finally:
        if writer is not None:
            writer.close()
        backend.close()


async def test_a_server_draining_one_stream_per_connection_loses_no_request(proxy_factory):
    """F14 (fresh-h2), issue 11 acceptance 2: a server that answers one stream per connection,
    then a graceful GOAWAY (RFC 9113 §6.8: the streams above last_stream_id were not
    processed) and closes. h2load's 20 requests, 5 at a time on one connection to the proxy:
    each refused stream is sent again on a new connection, up to 6 tries in all (Go's
    transport retries such requests, so Traefik served the tester's 10/10 where one replay
    gave 4 x 502); every request is answered 200, none twice."""
    import shutil

    import pytest

    if shutil.which("h2load") is None:
        pytest.skip("needs h2load")
    backend = await H2cBackend("goaway-each").start()
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        url = f"http://127.0.0.1:{proxy.port}/drain"
        code, out = await _run("h2load", "-n", "20", "-c", "1", "-m", "5", url, timeout=60)
        text = out.decode()
        assert code == 0 and "20 succeeded, 0 failed, 0 errored" in text, text
        assert "status codes: 20 2xx" in text, text
        # one answered stream per connection: exactly one connection per request
        assert backend.connections == 20
    finally:
        backend.close()
