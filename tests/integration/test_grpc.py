"""gRPC through the proxy with real peers: a stock grpcio client, a grpcio server behind an
h2c server URL (tests/grpc_peers.py), the proxy as a process (issue 11, acceptance 4 and 6).

The data-path tests run twice: `direct` (client to server, no proxy) is the reference that
proves each test means what it says with grpcio itself, `meshproxy` must give the client the
same. The error-mapping tests run through the proxy only: each makes the proxy fail a call
itself and checks the client gets a Trailers-Only response with the mapped grpc-status (gRPC
PROTOCOL-HTTP2.md; the mapping in meshproxy/http/grpc.py) and a grpc-message, never an HTTP
error page.

grpcio calls block: they run in a thread (`call`) so the event loop keeps serving what runs in
it (the h2-library backend, the proxy helpers).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_health.v1 import health_pb2

from meshproxy.http.grpc import BROKEN_MESSAGE, decode_grpc_message
from tests.grpc_peers import BreakingBackend, EchoClient, EchoServer
from tests.helpers import catch_all, free_port, lb, request, router, wait_for

MiB = 1024 * 1024


async def call(fn: Callable[[], Any]) -> Any:
    """Run a blocking grpcio call off the event loop."""
    return await asyncio.to_thread(fn)


async def failure(fn: Callable[[], Any]) -> grpc.RpcError:
    """Run a call that must fail; its error (code(), details(), trailing_metadata())."""
    try:
        await call(fn)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture(params=["direct", "meshproxy"])
async def address(request, echo, proxy_factory) -> str:
    """Where the client connects: the server itself, or a proxy routing everything to it."""
    if request.param == "direct":
        return echo.address
    proxy = await proxy_factory(catch_all(echo.url))
    return f"127.0.0.1:{proxy.port}"


async def proxied(proxy_factory, dynamic: dict[str, Any], **kwargs: Any) -> str:
    proxy = await proxy_factory(dynamic, **kwargs)
    return f"127.0.0.1:{proxy.port}"


def routed(url: str, middlewares: dict[str, Any] | None = None, **lb_options: Any) -> dict:
    """Every call on `web` through `middlewares` (in order) to one server."""
    middlewares = middlewares or {}
    return {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s", middlewares=list(middlewares))},
            "middlewares": middlewares,
            "services": {"s": lb(url, **lb_options)},
        }
    }


# ---------------------------------------------------------------- the four kinds of call


async def test_unary(address):
    """A unary call (PROTOCOL-HTTP2.md: one length-prefixed message each way, status in the
    trailers) arrives and returns unchanged."""
    with EchoClient(address) as client:
        assert await call(lambda: client.unary(b"hello", timeout=10)) == b"hello"
        assert await call(lambda: client.unary(b"", timeout=10)) == b""


async def test_server_streaming(address):
    """Server streaming: every message of the stream, in order, then the OK status."""
    with EchoClient(address) as client:
        messages = await call(lambda: list(client.server_stream(b"50:1000", timeout=10)))
    assert [len(m) for m in messages] == [1000] * 50
    assert [m[0] for m in messages] == [i % 256 for i in range(50)]


async def test_client_streaming(address):
    """Client streaming: all the client's messages reach the server, which answers once."""
    with EchoClient(address) as client:
        answer = await call(lambda: client.client_stream(iter([b"x" * 10] * 100), timeout=10))
    assert answer == b"1000:100"


async def test_bidirectional_is_interleaved(address):
    """Bidirectional streaming where each message is sent only after the answer to the
    previous one arrived: it completes only if nothing on the way holds a stream's messages
    back until its end (flow per message, not per call)."""
    with EchoClient(address) as client:
        answers: queue.Queue[bytes] = queue.Queue()

        def requests() -> Iterator[bytes]:
            for index in range(20):
                message = b"ping %d" % index
                yield message
                assert answers.get(timeout=5) == message  # the echo came back first

        def run() -> int:
            count = 0
            for answer in client.bidi(requests(), timeout=20):
                answers.put(answer)
                count += 1
            return count

        assert await call(run) == 20


async def test_four_mib_messages_every_kind(address):
    """4 MiB messages (gRPC's default receive limit) each way, in every kind of call."""
    big = os.urandom(4 * MiB)
    digest = hashlib.sha256(big).digest()
    with EchoClient(address) as client:
        echoed = await call(lambda: client.unary(big, timeout=30))
        assert hashlib.sha256(echoed).digest() == digest
        streamed = await call(lambda: list(client.server_stream(b"3:%d" % (4 * MiB), timeout=30)))
        assert [len(m) for m in streamed] == [4 * MiB] * 3
        total = await call(lambda: client.client_stream(iter([big] * 3), timeout=30))
        assert total == b"%d:3" % (12 * MiB)
        both = await call(lambda: list(client.bidi(iter([big, big]), timeout=30)))
        assert [hashlib.sha256(m).digest() for m in both] == [digest, digest]


# ---------------------------------------------------------------- metadata and statuses


async def test_metadata_both_ways_binary_included(address, echo):
    """Custom metadata, ASCII and binary (`-bin`, base64 on the wire: PROTOCOL-HTTP2.md
    "Custom-Metadata"), reaches the server unchanged and comes back unchanged as the
    server's initial and trailing metadata."""
    binary = bytes(range(256))
    sent = (("x-token", "abc 123"), ("x-data-bin", binary), ("x-echo-metadata", "1"))
    with EchoClient(address) as client:
        answer, result = await call(lambda: client.unary.with_call(b"m", metadata=sent, timeout=10))
    assert answer == b"m"
    seen = dict(echo.calls[-1].metadata)
    assert seen["x-token"] == "abc 123" and seen["x-data-bin"] == binary
    initial = dict(result.initial_metadata())
    trailing = dict(result.trailing_metadata())
    assert initial["x-token"] == "abc 123" and initial["x-data-bin"] == binary
    assert trailing["t-x-token"] == "abc 123" and trailing["t-x-data-bin"] == binary


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (grpc.StatusCode.NOT_FOUND, "no such thing"),
        (grpc.StatusCode.INVALID_ARGUMENT, "café ☕ 100% bad\targument"),
        (grpc.StatusCode.UNAVAILABLE, "backend says unavailable"),
        (grpc.StatusCode.PERMISSION_DENIED, "日本語のメッセージ"),
        (grpc.StatusCode.INTERNAL, ""),
    ],
)
async def test_backend_status_and_message_unchanged(address, code, message):
    """The backend's grpc-status and grpc-message (percent-encoded UTF-8, non-ASCII included)
    reach the client as it sent them, with its trailing metadata."""
    metadata = (("x-status", str(code.value[0])), ("x-message-bin", message.encode()))
    with EchoClient(address) as client:
        error = await failure(lambda: client.unary(b"x", metadata=metadata, timeout=10))
        assert (error.code(), error.details()) == (code, message)
        error = await failure(lambda: list(client.server_stream(b"1:1", metadata=metadata)))
        assert (error.code(), error.details()) == (code, message)


# ---------------------------------------------------------------- deadlines and cancellation


async def test_client_deadline_shorter_than_the_backend(address, echo):
    """A deadline shorter than the backend's delay: the client gets DEADLINE_EXCEEDED and the
    backend sees the call cancelled (the cancellation travels through the proxy), having
    seen a deadline no later than the client's."""
    with EchoClient(address) as client:
        error = await failure(
            lambda: client.unary(b"x", metadata=(("x-delay", "30"),), timeout=0.5)
        )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = await call(echo.wait_cancelled)
    assert cancelled is not None and cancelled.method == "Unary"
    # no later than the client's, but for grpc-core rounding the grpc-timeout it sends up
    assert cancelled.time_remaining is not None and cancelled.time_remaining <= 0.52


async def test_deadline_is_propagated(address, echo):
    """PROTOCOL-HTTP2.md "Timeout": the client's deadline reaches the backend as grpc-timeout
    (through the proxy: the time left, never more than the client's)."""
    with EchoClient(address) as client:
        assert await call(lambda: client.unary(b"x", timeout=7)) == b"x"
        assert await call(lambda: client.unary(b"y")) == b"y"  # no deadline at all
    with_deadline, without = echo.calls[-2:]
    # grpc-core rounds the value it sends up (7 s can leave as "7009m")
    assert with_deadline.time_remaining is not None and 5 < with_deadline.time_remaining <= 7.1
    assert without.time_remaining is not None and without.time_remaining > 1e9  # infinite


async def test_client_cancellation_reaches_the_backend(address, echo):
    """A client that cancels a call (RST_STREAM CANCEL on its side) cancels it at the backend
    too: the proxy does not leave the backend working for nobody."""
    with EchoClient(address) as client:
        future = client.unary.future(b"x", metadata=(("x-delay", "30"),), timeout=60)
        await wait_for(lambda: echo.calls, 10, "the call to reach the backend")
        future.cancel()
        cancelled = await call(echo.wait_cancelled)
    assert cancelled is not None and cancelled.method == "Unary"


async def test_cancelling_a_server_stream_stops_the_backend(address, echo):
    """Cancelling a server stream mid-way stops the backend's stream (it sees the call
    inactive), rather than the proxy draining it."""
    with EchoClient(address) as client:
        stream = client.server_stream(b"100000:1000", timeout=60)
        first = await call(lambda: next(stream))
        assert len(first) == 1000
        stream.cancel()
        cancelled = await call(echo.wait_cancelled)
    assert cancelled is not None and cancelled.method == "ServerStream"


# ---------------------------------------------------------------- health checking


async def test_health_checking_protocol(address, echo):
    """The standard health-checking protocol (grpc.health.v1, grpcio-health-checking) works
    through the proxy: Check of the server and of one service, NOT_FOUND for an unknown
    service, and Watch's server stream sees a change of status as it happens."""
    echo.set_serving("", True)
    echo.set_serving("test.Echo", True)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with EchoClient(address) as client:
        check = client.health.Check
        assert (await call(lambda: check(health_pb2.HealthCheckRequest(), timeout=5))).status == (
            serving
        )
        request = health_pb2.HealthCheckRequest(service="test.Echo")
        assert (await call(lambda: check(request, timeout=5))).status == serving
        unknown = health_pb2.HealthCheckRequest(service="nope")
        error = await failure(lambda: check(unknown, timeout=5))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        watch = client.health.Watch(request, timeout=20)
        assert (await call(lambda: next(watch))).status == serving
        echo.set_serving("test.Echo", False)
        assert (await call(lambda: next(watch))).status == not_serving
        watch.cancel()


# ---------------------------------------------------------------- errors the proxy makes


def assert_proxy_status(error: grpc.RpcError, code: grpc.StatusCode, details: str) -> None:
    assert (error.code(), error.details()) == (code, details), (error.code(), error.details())


async def test_no_route_is_unimplemented(proxy_factory, echo):
    """Issue 11: no router matches (Traefik's 404) -> UNIMPLEMENTED, as a gRPC server answers an
    unknown method (http-grpc-status-mapping.md: 404 -> UNIMPLEMENTED)."""
    dynamic = {
        "http": {
            "routers": {"r": router("PathPrefix(`/other.Service/`)", "s")},
            "services": {"s": lb(echo.url)},
        }
    }
    proxy = await proxy_factory(dynamic)
    with EchoClient(f"127.0.0.1:{proxy.port}") as client:
        error = await failure(lambda: client.unary(b"x", timeout=10))
        assert_proxy_status(error, grpc.StatusCode.UNIMPLEMENTED, "404 page not found")
        error = await failure(lambda: list(client.bidi(iter([b"a", b"b"]), timeout=10)))
        assert_proxy_status(error, grpc.StatusCode.UNIMPLEMENTED, "404 page not found")
    assert echo.calls == []
    # Traefik's metrics: the protocol label says grpc, the code what the answer stands for
    series = re.findall(r"traefik_entrypoint_requests_total\{([^}]*)\} (\S+)", proxy.metrics())
    grpc_series = [(labels, value) for labels, value in series if 'protocol="grpc"' in labels]
    assert len(grpc_series) == 1 and float(grpc_series[0][1]) == 2
    assert 'code="404"' in grpc_series[0][0]


async def test_no_server_is_unavailable(proxy_factory):
    """A service with no servers (Traefik's 503 "no available server") -> UNAVAILABLE."""
    dynamic = {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s")},
            "services": {"s": {"loadBalancer": {"servers": []}}},
        }
    }
    address = await proxied(proxy_factory, dynamic)
    with EchoClient(address) as client:
        error = await failure(lambda: client.unary(b"x", timeout=10))
    assert_proxy_status(error, grpc.StatusCode.UNAVAILABLE, "no available server")


async def test_connect_failure_is_unavailable(proxy_factory):
    """A server whose port is closed (Traefik's 502) -> UNAVAILABLE."""
    address = await proxied(proxy_factory, catch_all(f"h2c://127.0.0.1:{free_port()}"))
    with EchoClient(address) as client:
        error = await failure(lambda: client.unary(b"x", timeout=10))
    assert_proxy_status(error, grpc.StatusCode.UNAVAILABLE, "Bad Gateway")


async def test_response_header_timeout_is_deadline_exceeded(proxy_factory, echo):
    """The proxy's own timeout (responseHeaderTimeout, 300 ms) shorter than the client's
    deadline (20 s): the proxy's 504 -> DEADLINE_EXCEEDED (issue 11), the backend's call is
    cancelled, and the proxy gave up well before the client would have."""
    address = await proxied(
        proxy_factory,
        catch_all(echo.url),
        extra_flags=["--serversTransport.forwardingTimeouts.responseHeaderTimeout=300ms"],
    )
    with EchoClient(address) as client:
        started = time.monotonic()
        error = await failure(lambda: client.unary(b"x", metadata=(("x-delay", "30"),), timeout=20))
        elapsed = time.monotonic() - started
    assert_proxy_status(error, grpc.StatusCode.DEADLINE_EXCEEDED, "Gateway Timeout")
    assert 0.3 <= elapsed < 5
    assert await call(echo.wait_cancelled) is not None


async def test_rate_limited_is_resource_exhausted(proxy_factory, echo):
    """rateLimit refusing a call (Traefik's 429) -> RESOURCE_EXHAUSTED (issue 11)."""
    limit = {"rl": {"rateLimit": {"average": 1, "period": "1m", "burst": 1}}}
    address = await proxied(proxy_factory, routed(echo.url, limit))
    with EchoClient(address) as client:
        assert await call(lambda: client.unary(b"x", timeout=10)) == b"x"
        error = await failure(lambda: client.unary(b"x", timeout=10))
    assert_proxy_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "Too Many Requests")
    assert len(echo.calls) == 1


async def test_in_flight_limit_is_resource_exhausted(proxy_factory, echo):
    """inFlightReq over its amount (Traefik's 429) -> RESOURCE_EXHAUSTED."""
    limit = {"one": {"inFlightReq": {"amount": 1}}}
    address = await proxied(proxy_factory, routed(echo.url, limit))
    with EchoClient(address) as client:
        held = client.unary.future(b"x", metadata=(("x-delay", "30"),), timeout=60)
        await wait_for(lambda: echo.calls, 10, "the first call to reach the backend")
        error = await failure(lambda: client.unary(b"y", timeout=10))
        held.cancel()
    assert_proxy_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "Too Many Requests")


async def test_open_circuit_breaker_is_unavailable(proxy_factory):
    """A circuitBreaker that opened on network errors answers 503 itself -> UNAVAILABLE, with
    its own message (the connect failures before it were "Bad Gateway")."""
    breaker = {
        "cb": {
            "circuitBreaker": {
                "expression": "NetworkErrorRatio() > 0.5",
                "checkPeriod": "50ms",
                "fallbackDuration": "1m",
            }
        }
    }
    address = await proxied(proxy_factory, routed(f"h2c://127.0.0.1:{free_port()}", breaker))
    with EchoClient(address) as client:
        seen: list[str] = []

        async def opened() -> bool:
            error = await failure(lambda: client.unary(b"x", timeout=10))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            seen.append(error.details())
            return error.details() == "Service Unavailable"

        deadline = time.monotonic() + 10
        while not await opened():
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
    assert seen[0] == "Bad Gateway"


async def test_ip_allow_list_is_permission_denied(proxy_factory, echo):
    """ipAllowList refusing the client (Traefik's 403) -> PERMISSION_DENIED (issue 11)."""
    allow = {"acl": {"ipAllowList": {"sourceRange": ["10.0.0.0/8"]}}}
    address = await proxied(proxy_factory, routed(echo.url, allow))
    with EchoClient(address) as client:
        error = await failure(lambda: client.unary(b"x", timeout=10))
    assert_proxy_status(error, grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
    assert echo.calls == []


async def test_stream_broken_after_the_response_started_ends_with_a_status(proxy_factory):
    """Issue 11: a stream that breaks after its response started (the backend reset it, or
    its connection died) ends with a grpc-status trailer, UNAVAILABLE and the proxy's
    message, not a bare reset the client could only report as a transport error."""
    for mode in ("reset", "close"):
        backend = await BreakingBackend(mode).start()
        try:
            address = await proxied(proxy_factory, catch_all(backend.url))
            with EchoClient(address) as client:
                stream = client.server_stream(b"1:1", timeout=10)
                first = await call(lambda stream=stream: next(stream))
                assert first == b"abc"
                error = await failure(lambda stream=stream: next(stream))
            assert_proxy_status(error, grpc.StatusCode.UNAVAILABLE, BROKEN_MESSAGE)
            assert backend.broken == 1
        finally:
            backend.close()


# ---------------------------------------------------------------- raw HTTP/2 and HTTP/1.1 peers


async def h2_call(port: int, headers: list[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """One request over a raw h2c connection (the `h2` library as the client, which enforces
    no deadline of its own): the response's headers, data and trailers, and whether the
    stream ended in the response HEADERS frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, headers)
    conn.send_data(stream, body, end_stream=True)
    writer.write(conn.data_to_send())
    result: dict[str, Any] = {"headers": None, "data": b"", "trailers": None, "ended": None}
    try:
        while result["ended"] is None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "connection closed before the stream ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    result["headers"] = dict(event.headers)
                    if event.stream_ended is not None:
                        result["ended"] = "headers"
                elif isinstance(event, h2.events.DataReceived):
                    result["data"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    result["trailers"] = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded) and result["ended"] is None:
                    result["ended"] = "data"
                elif isinstance(event, h2.events.StreamReset):
                    result["ended"] = "reset"
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return result


def grpc_headers(port: int, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", f"127.0.0.1:{port}"),
        (":path", "/test.Echo/Unary"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


async def test_trailers_only_is_one_headers_frame(proxy_factory):
    """PROTOCOL-HTTP2.md "Trailers-Only": the proxy's answer is one HEADERS frame that ends
    the stream, with :status 200, content-type application/grpc, grpc-status and a
    percent-encoded grpc-message, and no DATA frame."""
    proxy = await proxy_factory({"http": {"routers": {}, "services": {}}})
    result = await h2_call(proxy.port, grpc_headers(proxy.port), b"\x00\x00\x00\x00\x00")
    assert result["ended"] == "headers" and result["data"] == b""
    headers = result["headers"]
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"12"
    assert decode_grpc_message(headers[b"grpc-message"]) == "404 page not found"


@pytest.mark.parametrize("scheme", ["h2c", "http"])
async def test_proxy_deadline_without_a_client_enforcing_it(proxy_factory, scripted, scheme):
    """The proxy enforces the call's grpc-timeout itself (the smaller of it and its own
    responseHeaderTimeout, 60 s here): a client that sends grpc-timeout 300m and does not
    enforce it (the raw h2 client) to a backend that ignores it (h2c: an h2-library server
    that never answers; http: an HTTP/1.1 server holding the request) still gets
    DEADLINE_EXCEEDED as Trailers-Only, within the pools' once-a-second check, and the
    backend's stream or connection is ended."""
    if scheme == "h2c":
        backend = await BreakingBackend("hold").start()
    else:
        backend = await scripted()
        backend.mode = "hold"
    try:
        proxy = await proxy_factory(catch_all(backend.url))
        headers = grpc_headers(proxy.port, ("grpc-timeout", "300m"))
        started = time.monotonic()
        result = await h2_call(proxy.port, headers, b"\x00\x00\x00\x00\x01x")
        elapsed = time.monotonic() - started
        assert result["ended"] == "headers", result
        assert result["headers"][b"grpc-status"] == b"4"
        assert 0.3 <= elapsed < 3
        if scheme == "h2c":
            assert backend.held == 1
            await wait_for(lambda: backend.ended == 1, 5, "the held stream to be ended")
        else:
            assert len(backend.requests) == 1
    finally:
        backend.close()


async def test_backend_enforces_the_forwarded_deadline(proxy_factory, echo):
    """Propagation's effect: a grpcio backend gets the time left as grpc-timeout and ends the
    call itself on time (DEADLINE_EXCEEDED from the backend, relayed), even for a client that
    does not enforce its deadline (the raw h2 client); its call is cancelled."""
    proxy = await proxy_factory(catch_all(echo.url))
    headers = grpc_headers(proxy.port, ("grpc-timeout", "300m"), ("x-delay", "30"))
    started = time.monotonic()
    result = await h2_call(proxy.port, headers, b"\x00\x00\x00\x00\x01x")
    assert 0.3 <= time.monotonic() - started < 3
    fields = result["headers"] if result["ended"] == "headers" else result["trailers"]
    assert fields is not None and fields[b"grpc-status"] == b"4", result
    assert await call(echo.wait_cancelled) is not None


async def test_malformed_grpc_timeout_is_internal(proxy_factory, echo):
    """A malformed grpc-timeout ("5x": not a unit) is answered as grpc-go's server answers it,
    INTERNAL "malformed grpc-timeout", and never reaches the backend."""
    proxy = await proxy_factory(catch_all(echo.url))
    headers = grpc_headers(proxy.port, ("grpc-timeout", "5x"))
    result = await h2_call(proxy.port, headers, b"\x00\x00\x00\x00\x00")
    assert result["ended"] == "headers"
    assert result["headers"][b"grpc-status"] == b"13"
    assert decode_grpc_message(result["headers"][b"grpc-message"]) == (
        "malformed grpc-timeout: '5x'"
    )
    assert echo.calls == []


async def test_http1_grpc_request_gets_the_fields_as_headers(proxy_factory):
    """Over HTTP/1.1 (h11 as the client) a gRPC request's local answer carries the same
    fields as an ordinary head and an empty body: 200, application/grpc, grpc-status 14,
    grpc-message, content-length 0."""
    proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{free_port()}"))
    headers = {"content-type": "application/grpc+proto", "te": "trailers"}
    response = await request(proxy.port, "POST", "/test.Echo/Unary", headers, b"\x00" * 5)
    assert response.status == 200 and response.body == b""
    assert response.headers["content-type"] == "application/grpc"
    assert response.headers["grpc-status"] == "14"
    assert response.headers["grpc-message"] == "Bad Gateway"
    assert response.headers["content-length"] == "0"
    plain = await request(proxy.port, "POST", "/x", {"content-type": "text/plain"}, b"hi")
    assert plain.status == 502


async def test_client_protocol_error_is_a_grpc_status(proxy_factory, echo):
    """A call the proxy refuses for the client's own error while the stream still exists (a
    path with broken percent-encoding: 400 before routing, as Traefik) reaches the grpcio
    client as a status (400 -> INTERNAL, http-grpc-status-mapping.md), not an HTTP page, and
    never reaches the backend."""
    address = await proxied(proxy_factory, catch_all(echo.url))
    with EchoClient(address) as client:
        broken = client.channel.unary_unary("/test.Echo/Un%zzary")
        error = await failure(lambda: broken(b"x", timeout=10))
    assert_proxy_status(error, grpc.StatusCode.INTERNAL, "400 Bad Request")
    assert echo.calls == []
