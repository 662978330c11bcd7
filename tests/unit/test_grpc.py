"""meshproxy.http.grpc: recognising a gRPC call and speaking gRPC in the proxy's own answers
(gRPC doc/PROTOCOL-HTTP2.md, doc/http-grpc-status-mapping.md, doc/statuscodes.md)."""

from __future__ import annotations

import asyncio
from time import perf_counter

import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.http import grpc
from meshproxy.http.exchange import Exchange, NullSink
from meshproxy.http.request import Request
from meshproxy.http.upstream import TransportSettings
from tests.conversation import BACKEND, conversation, head_of
from tests.helpers import wait_for
from tests.unit.test_h2_server_conversations import (
    H2Conversation,
    body_of,
    of,
    request_headers,
)


def make_request(content_type: bytes | None) -> Request:
    headers = [(b"te", b"trailers")]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    return Request("POST", b"/pkg.Svc/Method", headers, b"svc", "127.0.0.1", 40000, "2")


def make_exchange(content_type: bytes | None) -> Exchange:
    return Exchange(NullSink(), make_request(content_type), "web", perf_counter(), True)


# ---------------------------------------------------------------- is_grpc


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/grpc",
        b"application/grpc+proto",
        b"application/grpc+json",
        b"application/grpc;charset=utf-8",
        b"Application/gRPC+proto",
    ],
)
def test_grpc_content_types(content_type):
    """PROTOCOL-HTTP2.md: Content-Type = "application/grpc" [("+proto" / "+json" / {custom})];
    grpc-go's ContentSubtype also takes ";params"; media types are case-insensitive (RFC 9110
    §8.3.1)."""
    assert grpc.is_grpc(make_request(content_type))


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        b"application/json",
        b"application/grpc-web",
        b"application/grpc-web+proto",
        b"application/grpc-web-text",
        b"application/grpcfoo",
        b"text/application/grpc",
    ],
)
def test_not_grpc_content_types(content_type):
    """gRPC-Web keeps its HTTP answers (its clients read trailers from the body), and a
    content-type that only starts with the letters of application/grpc is not gRPC (grpc-go's
    ContentSubtype wants "+" or ";" after it)."""
    assert not grpc.is_grpc(make_request(content_type))


# ---------------------------------------------------------------- status mapping


@pytest.mark.parametrize(
    ("http_status", "code"),
    [
        (404, grpc.UNIMPLEMENTED),  # no route (issue 11; http-grpc-status-mapping.md)
        (403, grpc.PERMISSION_DENIED),  # ipAllowList (issue 11; mapping doc)
        (429, grpc.RESOURCE_EXHAUSTED),  # rateLimit, inFlightReq (issue 11)
        (502, grpc.UNAVAILABLE),  # connect failure, backend EOF (issue 11; mapping doc)
        (503, grpc.UNAVAILABLE),  # no server, breaker open (issue 11; mapping doc)
        (504, grpc.DEADLINE_EXCEEDED),  # response timeout, deadline (issue 11)
        (400, grpc.INTERNAL),  # malformed request, malformed grpc-timeout (mapping doc)
        (401, grpc.UNAUTHENTICATED),  # mapping doc
        (413, grpc.RESOURCE_EXHAUSTED),  # message over a limit (statuscodes.md)
        (431, grpc.RESOURCE_EXHAUSTED),  # metadata over a limit (as grpc-core)
        (500, grpc.UNKNOWN),  # "all other codes" (mapping doc)
        (418, grpc.UNKNOWN),
        (307, grpc.UNKNOWN),
    ],
)
def test_http_status_to_grpc_status(http_status, code):
    """The grpc-status of each answer the proxy makes itself: issue 11's five, then gRPC's
    doc/http-grpc-status-mapping.md for the rest (UNKNOWN for codes it does not name)."""
    assert grpc.grpc_status_for(http_status) == code


def test_local_answer_is_trailers_only():
    """PROTOCOL-HTTP2.md, Trailers-Only: Content-Type then the trailers (grpc-status,
    grpc-message) in the one HEADERS frame; nothing else on HTTP/2, and content-length 0 on
    HTTP/1.1 so the empty body is framed."""
    h2 = grpc.local_answer_fields(503, "no available server", http1=False)
    assert h2 == [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"no available server"),
    ]
    h1 = grpc.local_answer_fields(404, "404 page not found", http1=True)
    assert h1 == [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"12"),
        (b"grpc-message", b"404 page not found"),
        (b"content-length", b"0"),
    ]


def test_refusal_before_an_exchange():
    """A gRPC call the HTTP/2 server refuses before routing (431, 400...) gets the same
    Trailers-Only block, :status 200 first; any other request keeps its HTTP answer."""
    call = [(b":method", b"POST"), (b"content-type", b"application/grpc+proto")]
    assert grpc.h2_refusal_fields(call, 431, "431 Request Header Fields Too Large") == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"8"),
        (b"grpc-message", b"431 Request Header Fields Too Large"),
    ]
    assert grpc.h2_refusal_fields([(b"content-type", b"text/html")], 400, "bad") is None
    assert grpc.h2_refusal_fields([], 400, "bad") is None


# ---------------------------------------------------------------- grpc-message


def test_grpc_message_percent_encoding():
    """PROTOCOL-HTTP2.md, Status-Message: UTF-8, then every byte outside %x20-%x24 / %x26-%x7E
    is %XX ("%" itself included); printable ASCII and space stay as they are."""
    assert grpc.encode_grpc_message("no available server") == b"no available server"
    assert grpc.encode_grpc_message("100% sure") == b"100%25 sure"
    assert grpc.encode_grpc_message("café") == b"caf%C3%A9"
    assert grpc.encode_grpc_message("a\r\nb\x7f") == b"a%0D%0Ab%7F"
    assert grpc.encode_grpc_message("日本") == b"%E6%97%A5%E6%9C%AC"


def test_grpc_message_decoding_keeps_broken_escapes():
    """PROTOCOL-HTTP2.md: when decoding an invalid value an implementation MUST NOT error or
    throw the message away: broken escapes stay as they are, invalid UTF-8 becomes U+FFFD."""
    assert grpc.decode_grpc_message(b"caf%C3%A9") == "café"
    assert grpc.decode_grpc_message(b"100%25") == "100%"
    assert grpc.decode_grpc_message(b"50% off %zz %4") == "50% off %zz %4"
    assert grpc.decode_grpc_message(b"bad %FF byte") == "bad \ufffd byte"
    assert grpc.decode_grpc_message(b"%") == "%"


@given(st.text())
def test_grpc_message_round_trip(text):
    """Any text survives encoding and decoding, and its encoding is only the bytes the
    grammar leaves unencoded plus %XX triplets (so it is a valid field value)."""
    encoded = grpc.encode_grpc_message(text)
    assert all(0x20 <= byte <= 0x7E for byte in encoded)
    assert grpc.decode_grpc_message(encoded) == text.encode("utf-8", "replace").decode(
        "utf-8", "replace"
    )


# ---------------------------------------------------------------- grpc-timeout


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"100m", 0.1),
        (b"5S", 5.0),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"250u", 0.00025),
        (b"999n", 999e-9),
        (b"99999999S", 99_999_999.0),
        (b"0S", 0.0),
        (b"00000010m", 0.01),
    ],
)
def test_parse_grpc_timeout(value, seconds):
    """PROTOCOL-HTTP2.md: Timeout = TimeoutValue TimeoutUnit, the value 1 to 8 digits, the unit
    H (hours), M (minutes), S, m (milli), u (micro), n (nano)."""
    assert grpc.parse_grpc_timeout(value) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize(
    "value",
    [b"", b"S", b"5", b"5s", b"5x", b"100000000S", b"-5S", b"+5S", b" 5S", b"5 S", b"1.5S"],
)
def test_malformed_grpc_timeout(value):
    """Anything but 1 to 8 digits and one of the six units is malformed (grpc-go: INTERNAL
    "malformed grpc-timeout"; the proxy answers 400, mapped to INTERNAL). Nine digits is over
    the spec's 8; a sign or a fraction is not a positive integer."""
    with pytest.raises(grpc.MalformedTimeout):
        grpc.parse_grpc_timeout(value)


@pytest.mark.parametrize(
    ("seconds", "value"),
    [
        # grpc-go's encodeTimeout rule (internal/transport/http_util.go), worked by hand
        (0.0, b"0n"),
        (-1.0, b"0n"),
        (1e-9, b"1n"),
        (10e-9, b"10n"),
        (100e-9, b"100n"),
        (1e-6, b"1000n"),
        (0.001, b"1000000n"),
        (0.01, b"10000000n"),
        (0.1, b"100000u"),
        (1.0, b"1000000u"),
        (10.0, b"10000000u"),
        (100.0, b"100000m"),
        (1000.0, b"1000000m"),
        (10000.0, b"10000000m"),
        (100000.0, b"100000S"),
        (1000000.0, b"1000000S"),
        (10000000.0, b"10000000S"),
        (100000000.0, b"1666667M"),
        (2e10, b"5555556H"),  # 333,333,334 minutes is 9 digits
        (1e15, b"99999999H"),
    ],
)
def test_format_grpc_timeout(seconds, value):
    """The finest unit whose count fits in 8 digits, rounded up, as grpc-go's encodeTimeout;
    capped at 8 digits of hours."""
    assert grpc.format_grpc_timeout(seconds) == value


@given(st.floats(min_value=1e-9, max_value=99_999_999 * 3600.0, allow_nan=False))
def test_formatted_timeout_parses_back_never_shorter(seconds):
    """Whatever we write is a valid grpc-timeout (our parser, which follows the grammar, takes
    it) and never shortens the time left by more than float rounding: the callee's deadline
    is not earlier than the caller's."""
    value = grpc.format_grpc_timeout(seconds)
    assert grpc.parse_grpc_timeout(value) >= seconds * (1 - 1e-12)


# ---------------------------------------------------------------- a broken stream


def test_abort_trailers_for_a_grpc_call():
    """Issue 11: a gRPC stream that breaks after its response started ends with a grpc-status
    trailer (UNAVAILABLE) and a grpc-message, not a bare reset."""
    trailers = grpc.abort_trailers(make_exchange(b"application/grpc"))
    assert trailers is not None
    fields = dict(trailers)
    assert fields[b"grpc-status"] == b"14"
    assert grpc.decode_grpc_message(fields[b"grpc-message"]) == grpc.BROKEN_MESSAGE


def test_abort_trailers_past_the_deadline():
    """A call cut because its deadline passed after the response started reports
    DEADLINE_EXCEEDED, as a gRPC server would for its own deadline."""
    ex = make_exchange(b"application/grpc+proto")
    ex.deadline = perf_counter() - 0.001
    fields = dict(grpc.abort_trailers(ex) or [])
    assert fields[b"grpc-status"] == b"4"
    ex.deadline = perf_counter() + 60
    assert dict(grpc.abort_trailers(ex) or [])[b"grpc-status"] == b"14"


def test_no_abort_trailers_for_other_exchanges():
    """Only a gRPC call gets trailers; any other exchange (gRPC-Web included) is reset, and
    nothing is written to a client that is gone."""
    assert grpc.abort_trailers(make_exchange(b"text/plain")) is None
    assert grpc.abort_trailers(make_exchange(b"application/grpc-web")) is None
    gone = make_exchange(b"application/grpc")
    gone.client_gone = True
    assert grpc.abort_trailers(gone) is None


# ---------------------------------------------------------------- local answers over HTTP/1.1

GRPC_CALL = (
    b"POST /pkg.Svc/Method HTTP/1.1\r\nHost: svc.test\r\ncontent-type: application/grpc\r\n"
    b"te: trailers\r\ncontent-length: 5\r\n\r\n\x00\x00\x00\x00\x00"
)


ONLY_OTHER_HOST = {
    "http": {
        "routers": {"r": {"entryPoints": ["web"], "service": "s", "rule": "Host(`other`)"}},
        "services": {"s": {"loadBalancer": {"servers": [{"url": BACKEND}]}}},
    }
}


async def settle() -> None:
    """One loop turn: the server starts an exchange with a body on the next turn."""
    await asyncio.sleep(0)


def grpc_answer(data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    line, fields = head_of(data)
    return line, fields, data.split(b"\r\n\r\n", 1)[1]


async def test_no_route_reaches_a_grpc_client_as_unimplemented():
    """Issue 11 / PROTOCOL-HTTP2.md Trailers-Only: the proxy's 404 (no router matches) reaches a
    gRPC call as :status 200, content-type application/grpc, grpc-status 12 (UNIMPLEMENTED)
    and a grpc-message; over HTTP/1.1 the same fields with an empty body. The metrics still
    count the HTTP answer it stands for (404)."""
    conv = conversation(ONLY_OTHER_HOST)
    conv.send(GRPC_CALL)
    await settle()
    line, fields, body = grpc_answer(conv.client_transport.take())
    assert line == b"HTTP/1.1 200 OK"
    assert fields[b"content-type"] == b"application/grpc"
    assert fields[b"grpc-status"] == b"12"
    assert fields[b"grpc-message"] == b"404 page not found"
    assert fields[b"content-length"] == b"0" and body == b""
    assert conv.entrypoint_requests() == {404: 1}
    # the connection stays usable: a plain HTTP request still gets Traefik's 404 page
    plain = conv.send(b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n")
    await settle()
    plain += conv.client_transport.take()
    assert plain.startswith(b"HTTP/1.1 404 ") and plain.endswith(b"404 page not found\n")


async def test_backend_closing_before_answering_reaches_a_grpc_client_as_unavailable():
    """A backend that closes the connection without answering is Traefik's 502: a gRPC call
    gets grpc-status 14 (UNAVAILABLE; issue 11, http-grpc-status-mapping.md)."""
    conv = conversation()
    conn, _ = conv.add_upstream()
    assert conv.send(GRPC_CALL) == b""
    await settle()
    assert conv.upstream_received().startswith(b"POST /pkg.Svc/Method HTTP/1.1\r\n")
    conn.connection_lost(None)
    line, fields, body = grpc_answer(conv.client_transport.take())
    assert line == b"HTTP/1.1 200 OK"
    assert (fields[b"grpc-status"], body) == (b"14", b"")
    assert fields[b"grpc-message"] == b"Bad Gateway"
    assert conv.entrypoint_requests() == {502: 1}


async def test_backend_answer_to_a_grpc_call_is_relayed_unchanged():
    """Only the proxy's own answers are rewritten: a backend's HTTP answer (even a 503) goes
    to the client as the backend sent it, status and body."""
    conv = conversation()
    conv.add_upstream()
    conv.send(GRPC_CALL)
    await settle()
    conv.upstream_received()
    answer = conv.backend_sends(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
    assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"\r\n\r\nbusy")
    assert b"grpc-status" not in answer


# ---------------------------------------------------------------- deadlines (grpc-timeout)


def grpc_call(timeout: bytes) -> bytes:
    return GRPC_CALL.replace(
        b"te: trailers\r\n", b"te: trailers\r\ngrpc-timeout: " + timeout + b"\r\n"
    )


async def sweep_until_answered(conv) -> bytes:
    """Run the pools' sweep (the daemon runs it once a second) until the client got bytes."""
    loop = asyncio.get_running_loop()

    def answered() -> bytes:
        conv.pool.sweep(loop.time())
        return bytes(conv.client_transport.written) or conv.client_transport.aborted

    await wait_for(answered, 5, "the deadline to fail the exchange")
    return conv.client_transport.take()


async def test_deadline_before_the_response_is_deadline_exceeded():
    """PROTOCOL-HTTP2.md "Timeout" / issue 11: the proxy's own deadline is the smaller of its
    response timeout (60 s here) and the client's grpc-timeout (80 ms): past it, with no
    response head yet, the call fails as a response timeout (504), which a gRPC client reads
    as DEADLINE_EXCEEDED (4); the backend connection is closed, and not before the deadline."""
    conv = conversation()
    conn, upstream = conv.add_upstream()
    started = perf_counter()
    conv.send(grpc_call(b"80m"))
    await settle()
    assert b"grpc-timeout: 80m\r\n" in conv.upstream_received()
    line, fields, body = grpc_answer(await sweep_until_answered(conv))
    assert perf_counter() - started >= 0.08
    assert line == b"HTTP/1.1 200 OK"
    assert fields[b"grpc-status"] == b"4" and body == b""
    assert upstream.closed and conv.entrypoint_requests() == {504: 1}


async def test_response_header_timeout_shorter_than_the_deadline_wins():
    """The smaller of the two wins the other way too: responseHeaderTimeout (50 ms) before the
    client's 60 s grpc-timeout is the same 504, DEADLINE_EXCEEDED to a gRPC client."""
    conv = conversation(transport=TransportSettings(response_header_timeout=0.05))
    conv.add_upstream()
    conv.send(grpc_call(b"60S"))
    await settle()
    _, fields, _ = grpc_answer(await sweep_until_answered(conv))
    assert fields[b"grpc-status"] == b"4"


async def test_deadline_after_the_response_started_cuts_the_response():
    """A deadline that passes mid-response cannot become a status any more: the exchange is
    aborted (on HTTP/1.1 the client connection is cut; on HTTP/2 the server ends the stream
    with http.grpc.abort_trailers, DEADLINE_EXCEEDED), the backend connection closed."""
    conv = conversation()
    conn, upstream = conv.add_upstream()
    conv.send(grpc_call(b"50m"))
    await settle()
    conv.upstream_received()
    head = conv.backend_sends(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"
        b"transfer-encoding: chunked\r\n\r\n5\r\n\x00\x00\x00\x00\x00\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200 OK")
    await sweep_until_answered(conv)
    assert conv.client_transport.aborted and upstream.closed


async def test_malformed_grpc_timeout_is_internal_and_never_forwarded():
    """grpc-go's server fails a call whose grpc-timeout is malformed with INTERNAL
    "malformed grpc-timeout" (HTTP 400 in its handler transport): the proxy answers the same
    (a 400, mapped to INTERNAL) before routing, and the backend sees nothing."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(grpc_call(b"5x"))
    await settle()
    _, fields, body = grpc_answer(conv.client_transport.take())
    assert fields[b"grpc-status"] == b"13" and body == b""
    assert grpc.decode_grpc_message(fields[b"grpc-message"]) == "malformed grpc-timeout: '5x'"
    assert upstream.take() == b"" and conv.entrypoint_requests() == {400: 1}


async def test_zero_grpc_timeout_is_already_exceeded():
    """A grpc-timeout of 0 is a call already past its deadline (grpc-go takes it as such):
    DEADLINE_EXCEEDED at once, nothing forwarded."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(grpc_call(b"0S"))
    await settle()
    _, fields, _ = grpc_answer(conv.client_transport.take())
    assert fields[b"grpc-status"] == b"4" and upstream.take() == b""


async def test_grpc_timeout_of_a_non_grpc_request_is_ignored():
    """grpc-timeout means something only on a gRPC call: on any other request (gRPC-Web
    included, whose clients get HTTP answers) it is an ordinary field, forwarded as it is."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(grpc_call(b"bogus").replace(b"application/grpc", b"application/grpc-web"))
    await settle()
    assert b"grpc-timeout: bogus\r\n" in upstream.take()


# ---------------------------------------------------------------- the same over HTTP/2 (frames)


def h2_grpc_call(h2c, timeout: bytes | None = None) -> int:
    extra = {"content_type": b"application/grpc", "te": b"trailers"}
    if timeout is not None:
        extra["grpc_timeout"] = timeout
    return h2c.request(request_headers(b"/pkg.Svc/Method", b"POST", **extra), b"\0\0\0\0\0")


def trailers_only(events, stream_id: int) -> dict[bytes, bytes]:
    """The fields of a Trailers-Only response: one HEADERS frame that ended the stream, no
    DATA (PROTOCOL-HTTP2.md)."""
    (response,) = of(events, h2.events.ResponseReceived, stream_id)
    assert response.stream_ended is not None, "the HEADERS frame did not end the stream"
    assert not of(events, h2.events.DataReceived, stream_id)
    return dict(response.headers)


async def test_h2_local_answer_is_one_headers_frame():
    """PROTOCOL-HTTP2.md Trailers-Only over HTTP/2: the proxy's 404 to a gRPC call is one
    HEADERS frame with END_STREAM: :status 200, application/grpc, grpc-status 12, and no
    content-length (nothing to frame)."""
    h2c = H2Conversation(dynamic=ONLY_OTHER_HOST)
    sid = h2_grpc_call(h2c)
    h2c.exchange()
    await wait_for(lambda: of(h2c.receive(), h2.events.StreamEnded, sid), 5, "the answer")
    fields = trailers_only(h2c.events, sid)
    assert fields[b":status"] == b"200" and fields[b"content-type"] == b"application/grpc"
    assert fields[b"grpc-status"] == b"12" and b"content-length" not in fields


async def test_h2_deadline_before_the_head_is_trailers_only_deadline_exceeded():
    """The call's grpc-timeout (30 ms) passes before the backend answers: Trailers-Only with
    DEADLINE_EXCEEDED (4), the backend connection closed."""
    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    sid = h2_grpc_call(h2c, b"30m")
    h2c.exchange()
    await settle()
    assert upstream.take().startswith(b"POST /pkg.Svc/Method HTTP/1.1")
    loop = asyncio.get_running_loop()

    def answered() -> list:
        h2c.conv.pool.sweep(loop.time())
        return of(h2c.receive(), h2.events.ResponseReceived, sid)

    await wait_for(answered, 5, "the deadline")
    fields = trailers_only(h2c.events, sid)
    assert fields[b"grpc-status"] == b"4" and upstream.closed


async def test_h2_deadline_after_the_head_ends_with_a_deadline_exceeded_trailer():
    """Past the deadline mid-response, the stream ends with a grpc-status 4 trailer
    (http.grpc.abort_trailers), after the message the backend had sent: not a reset."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2_grpc_call(h2c, b"30m")
    h2c.exchange()
    await settle()
    h2c.backend_sends(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
        b"\r\n6\r\n\0\0\0\0\x01m\r\n"
    )
    await settle()
    loop = asyncio.get_running_loop()

    def ended() -> list:
        h2c.conv.pool.sweep(loop.time())
        return of(h2c.receive(), h2.events.StreamEnded, sid)

    await wait_for(ended, 5, "the deadline")
    assert body_of(h2c.events, sid) == b"\0\0\0\0\x01m"
    (trailers,) = of(h2c.events, h2.events.TrailersReceived, sid)
    assert dict(trailers.headers)[b"grpc-status"] == b"4"
    assert not of(h2c.events, h2.events.StreamReset, sid)


async def test_h2_broken_stream_delivers_what_the_backend_sent_before_the_status():
    """A gRPC response that breaks (the backend's connection drops) right after a message:
    the client gets that message, then grpc-status 14 (UNAVAILABLE) in trailers. Dropping
    the message would lose a server stream's data the backend really sent (grpcio delivers
    messages that precede an error status)."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2_grpc_call(h2c)
    h2c.exchange()
    await settle()
    h2c.backend_sends(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
        b"\r\n6\r\n\0\0\0\0\x01m\r\n"
    )
    h2c.conv.upstreams[0][0].connection_lost(ConnectionResetError())  # in the same loop turn
    await settle()
    h2c.receive()
    assert body_of(h2c.events, sid) == b"\0\0\0\0\x01m"
    (trailers,) = of(h2c.events, h2.events.TrailersReceived, sid)
    assert dict(trailers.headers)[b"grpc-status"] == b"14"
