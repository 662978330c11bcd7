"""The HTTP/2 server side (meshproxy.http2.server) as conversations over in-memory transports:
frames in from a client built on the `h2` library, HTTP/1.1 bytes out to the backend (the real
dispatcher, router, balancer and HTTP/1.1 upstream run), and frames back to the client.

Each test names the rule it checks (RFC 9113 unless said otherwise)."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshproxy.http.server import EntryPointSettings
from meshproxy.http2.server import RESPONSE_BUFFER, H2ServerConnection
from tests.conversation import CATCH_ALL, MemoryTransport, conversation, head_of

OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def request_headers(path: bytes = b"/", method: bytes = b"GET", **extra: bytes) -> list:
    fields = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"a.test"),
        (b":path", path),
    ]
    fields += [(name.replace("_", "-").encode(), value) for name, value in extra.items()]
    return fields


class _Client(h2.connection.H2Connection):
    """h2's client, except that a GOAWAY does not stop it reading the streams the server
    still finishes (RFC 9113 §6.8; h2 closes its whole state machine at a GOAWAY)."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        return [], [event]


class H2Conversation:
    """One h2 client connected to an H2ServerConnection of entrypoint `web`; every request
    routes to the conversation's backend (HTTP/1.1 upstreams on memory transports)."""

    def __init__(
        self,
        settings: EntryPointSettings | None = None,
        dynamic: dict[str, Any] | None = None,
        client_settings: dict[int, int] | None = None,
        validate: bool = True,
    ) -> None:
        self.conv = conversation(dynamic, settings)
        self.entry = self.conv.entry
        self.server = H2ServerConnection(self.entry)
        self.transport = MemoryTransport(("127.0.0.7", 40002))
        self.transport.protocol = self.server
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.client = _Client(config)
        if client_settings:
            self.client.local_settings = h2.settings.Settings(
                client=True, initial_values=client_settings
            )
        self.client.initiate_connection()
        self.server.connection_made(self.transport)  # type: ignore[arg-type]
        self.events: list[Any] = []
        self.exchange()

    def exchange(self, raw: bytes = b"") -> list[Any]:
        """Send what the client has queued (and `raw` bytes after it), feed the server's
        answer back to the client; returns the client's new events."""
        data = self.client.data_to_send() + raw
        if data:
            self.server.data_received(data)
        return self.receive()

    def receive(self) -> list[Any]:
        """What the server wrote, once the current loop iteration is over (the server frames
        and writes the bodies of the streams answered in one iteration together)."""
        if self.server._push_scheduled:
            self.server._push_dirty()  # what the loop runs at the end of this iteration
        out = self.transport.take()
        events = self.client.receive_data(out) if out else []
        follow = self.client.data_to_send()
        if follow and not self.transport.closed:
            self.server.data_received(follow)  # the client's ACKs and window updates
            more = self.transport.take()
            if more:
                events += self.client.receive_data(more)
        self.events += events
        return events

    def request(self, headers: list, body: bytes | None = None, end: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=body is None and end)
        if body is not None:
            self.client.send_data(stream_id, body, end_stream=end)
        return stream_id

    def add_upstream(self) -> MemoryTransport:
        return self.conv.add_upstream()[1]

    def backend_sends(self, data: bytes, index: int = -1) -> list[Any]:
        self.conv.upstreams[index][0].data_received(data)
        return self.receive()


def of(events: list[Any], kind: type, stream_id: int | None = None) -> list[Any]:
    return [
        e
        for e in events
        if isinstance(e, kind) and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
    ]


def status_of(events: list[Any], stream_id: int) -> bytes:
    (response,) = of(events, h2.events.ResponseReceived, stream_id)
    return dict(response.headers)[b":status"]


def body_of(events: list[Any], stream_id: int) -> bytes:
    return b"".join(e.data for e in of(events, h2.events.DataReceived, stream_id))


def reset_code(events: list[Any], stream_id: int) -> int:
    (reset,) = of(events, h2.events.StreamReset, stream_id)
    return reset.error_code


def goaway_code(events: list[Any]) -> int:
    (goaway,) = of(events, h2.events.ConnectionTerminated)
    return goaway.error_code


# -- requests and responses ------------------------------------------------------------------


async def test_get_becomes_an_http11_request_and_the_answer_a_stream():
    """§8.3.1: :method, :path and :authority make the request line and Host; X-Forwarded-*
    are added as on HTTP/1.1 (Traefik); the answer comes back on the same stream, connection-
    specific fields dropped (§8.2.2)."""
    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    sid = h2c.request(request_headers(b"/x?q=1", accept=b"text/plain"))
    h2c.exchange()
    line, fields = head_of(upstream.take())
    assert line == b"GET /x?q=1 HTTP/1.1"
    assert fields[b"host"] == b"a.test" and fields[b"accept"] == b"text/plain"
    assert fields[b"x-forwarded-proto"] == b"http" and fields[b"x-forwarded-for"] == b"127.0.0.7"
    events = h2c.backend_sends(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: keep-alive\r\nX-App: y\r\n\r\nok"
    )
    (response,) = of(events, h2.events.ResponseReceived, sid)
    fields = dict(response.headers)
    assert fields[b":status"] == b"200" and fields[b"x-app"] == b"y"
    assert b"connection" not in fields and b"keep-alive" not in fields
    assert body_of(events, sid) == b"ok" and of(events, h2.events.StreamEnded, sid)
    assert h2c.server.streams == {}
    assert h2c.conv.entrypoint_requests() == {200: 1}


async def test_cookie_crumbs_are_joined_and_empty_ones_dropped():
    """RFC 9113 §8.2.3: crumbs of a split `cookie` are joined with "; " before the request goes
    out as HTTP/1.1; an empty crumb is a valid (empty) field value (RFC 9110 §5.5), not a
    malformed request: it is dropped, never a trailing "; " (fresh tester F3: RST_STREAM)."""
    cases = [
        ([b"a=1", b"b=2"], b"a=1; b=2"),
        ([b"a=1", b""], b"a=1"),
        ([b"", b"a=1", b"", b"b=2"], b"a=1; b=2"),
    ]
    for crumbs, joined in cases:
        h2c = H2Conversation()
        upstream = h2c.add_upstream()
        headers = request_headers(b"/c") + [(b"cookie", crumb) for crumb in crumbs]
        h2c.request(headers)
        h2c.exchange()
        line, fields = head_of(upstream.take())
        assert line == b"GET /c HTTP/1.1", crumbs
        assert fields[b"cookie"] == joined, crumbs


async def test_post_body_and_trailers_travel_as_chunked_http11_both_ways():
    """§8.1: DATA becomes the HTTP/1.1 body (chunked: no content-length), trailing HEADERS
    become chunked trailers when the client sent `te: trailers` (RFC 9110 §6.5); the backend's
    trailers come back as a trailing HEADERS frame with END_STREAM."""
    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    sid = h2c.request(request_headers(b"/up", b"POST", te=b"trailers"), b"hello ", end=False)
    h2c.client.send_data(sid, b"world")
    h2c.client.send_headers(sid, [(b"x-checksum", b"42")], end_stream=True)
    h2c.exchange()
    await asyncio.sleep(0)  # the exchange starts once this read's DATA is in
    h2c.exchange()
    sent = upstream.take()
    line, fields = head_of(sent)
    assert line == b"POST /up HTTP/1.1" and fields[b"transfer-encoding"] == b"chunked"
    assert fields[b"te"] == b"trailers"
    assert sent.endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\nx-checksum: 42\r\n\r\n")
    events = h2c.backend_sends(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        b"0\r\ngrpc-status: 0\r\n\r\n"
    )
    assert body_of(events, sid) == b"abc"
    (trailers,) = of(events, h2.events.TrailersReceived, sid)
    assert dict(trailers.headers) == {b"grpc-status": b"0"}


async def test_many_concurrent_streams_are_answered_in_any_order():
    """§5.1.1, §8.1: streams are independent; each answer reaches its own stream, in the
    order the backends answer, on one connection."""
    h2c = H2Conversation()
    ids = []
    for index in range(20):
        h2c.add_upstream()
        ids.append(h2c.request(request_headers(b"/%d" % index)))
        h2c.exchange()
    for index in reversed(range(20)):
        body = b"r%d" % index
        h2c.backend_sends(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), index
        )
    for index, sid in enumerate(ids):
        assert body_of(h2c.events, sid) == b"r%d" % index
    assert h2c.server.streams == {}


async def test_the_metrics_label_comes_from_the_request():
    """Traefik's `protocol` label: the HTTP/2 server leaves it to the metrics code, which
    says grpc for application/grpc."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(request_headers(b"/svc/M", b"POST", content_type=b"application/grpc"), b"")
    h2c.exchange()
    await asyncio.sleep(0)
    h2c.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert status_of(h2c.events, sid) == b"200"
    labels = {key[2] for key in h2c.conv.metrics.entrypoint}
    assert labels == {"grpc"}


# -- flow control ------------------------------------------------------------------------------


async def test_a_slow_reader_slows_only_its_own_stream():
    """§5.2, §6.9: a response the client's stream window cannot take is queued (bounded),
    then that exchange's upstream stops being read; another stream on the same connection
    is answered meanwhile; the client's WINDOW_UPDATE resumes the first."""
    h2c = H2Conversation(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    slow_upstream = h2c.add_upstream()
    slow = h2c.request(request_headers(b"/big"))
    h2c.exchange()
    big = 3 * RESPONSE_BUFFER
    h2c.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big, 0)
    h2c.backend_sends(b"x" * (RESPONSE_BUFFER + 2000), 0)
    assert len(body_of(h2c.events, slow)) == 1000  # the stream's window
    assert not slow_upstream.reading  # paused: the queue is over its bound
    h2c.add_upstream()
    fast = h2c.request(request_headers(b"/small"))
    h2c.exchange()
    h2c.backend_sends(OK_2, 1)
    assert body_of(h2c.events, fast) == b"ok"
    h2c.client.increment_flow_control_window(4 * RESPONSE_BUFFER, stream_id=slow)
    h2c.client.increment_flow_control_window(4 * RESPONSE_BUFFER)
    h2c.exchange()
    assert slow_upstream.reading
    assert len(body_of(h2c.events, slow)) == RESPONSE_BUFFER + 2000


async def test_request_data_is_acknowledged_only_as_it_is_passed_on():
    """§6.9: WINDOW_UPDATE for a stream's DATA only while its exchange reads; a backend
    that stops reading (pause_writing on its connection) stops the acknowledgements of that
    stream, which resume with it."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(request_headers(b"/up", b"POST"), b"a" * 1000, end=False)
    h2c.exchange()
    await asyncio.sleep(0)
    h2c.exchange()
    conn, _ = h2c.conv.upstreams[0]
    window = h2c.server.h2._get_stream_by_id(sid).inbound_flow_control_window
    conn.pause_writing()  # the backend's socket is full
    for _ in range(4):
        h2c.client.send_data(sid, b"b" * 10000)
    h2c.exchange()
    assert h2c.server.h2._get_stream_by_id(sid).inbound_flow_control_window < window - 30000
    conn.resume_writing()
    h2c.receive()
    stream = h2c.server.streams[sid]
    assert stream.unacked == 0 and not stream.body_paused


# -- the client goes away ------------------------------------------------------------------


async def test_client_reset_ends_the_exchange_and_drops_its_upstream():
    """§6.4: RST_STREAM from the client ends that stream only; the backend connection
    serving it is in an unknown state and is closed (as when an HTTP/1.1 client leaves)."""
    h2c = H2Conversation()
    first = h2c.add_upstream()
    sid = h2c.request(request_headers(b"/a"))
    h2c.exchange()
    h2c.add_upstream()
    other = h2c.request(request_headers(b"/b"))
    h2c.exchange()
    h2c.client.reset_stream(sid, ErrorCodes.CANCEL)
    h2c.exchange()
    assert first.closed
    h2c.backend_sends(OK_2, 1)
    assert body_of(h2c.events, other) == b"ok"
    assert 499 in h2c.conv.entrypoint_requests()


async def test_connection_lost_ends_every_exchange():
    h2c = H2Conversation()
    upstreams = [h2c.add_upstream() for _ in range(3)]
    for index in range(3):
        h2c.request(request_headers(b"/%d" % index))
    h2c.exchange()
    h2c.server.connection_lost(None)
    assert all(t.closed for t in upstreams)
    assert h2c.entry.h2_connections == set()


async def test_rapid_reset_gets_goaway_enhance_your_calm():
    """CVE-2023-44487: a client opening streams and resetting them at once, in a loop, gets
    GOAWAY(ENHANCE_YOUR_CALM) once half of its streams (past a minimum count) were reset
    before their response; the connection closes."""
    from meshproxy.http2.server import RAPID_RESET_MIN_STREAMS

    h2c = H2Conversation()
    for _ in range(RAPID_RESET_MIN_STREAMS + 10):
        h2c.add_upstream()
        sid = h2c.request(request_headers())
        h2c.client.reset_stream(sid, ErrorCodes.CANCEL)
        h2c.exchange()
        if h2c.transport.closed:
            break
    assert h2c.transport.closed
    assert goaway_code(h2c.events) == ErrorCodes.ENHANCE_YOUR_CALM
    assert h2c.server.opened <= RAPID_RESET_MIN_STREAMS


async def test_client_goaway_lets_open_streams_finish():
    """§6.8: after the client's GOAWAY(NO_ERROR) the streams it opened still get their
    answers; the connection closes when they are done."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(request_headers())
    h2c.exchange()
    h2c.client.close_connection()
    h2c.exchange()
    assert not h2c.transport.closed
    h2c.server.data_received(b"")  # nothing more from the client
    h2c.conv.upstreams[0][0].data_received(OK_2)
    out = h2c.transport.take()
    assert b"ok" in out
    assert h2c.transport.closed and sid == 1


async def test_graceful_shutdown_sends_goaway_and_finishes_streams():
    """§6.8: GOAWAY(NO_ERROR) names the last stream accepted; it still completes; a stream
    opened after it is refused (REFUSED_STREAM: never processed, §8.7); then the connection
    closes."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(request_headers())
    h2c.exchange()
    h2c.server.shutdown()
    events = h2c.receive()
    assert goaway_code(events) == ErrorCodes.NO_ERROR
    assert of(events, h2.events.ConnectionTerminated)[0].last_stream_id == sid
    h2c.backend_sends(OK_2)
    assert body_of(h2c.events, sid) == b"ok"
    assert h2c.transport.closed


async def test_an_idle_connection_is_closed_by_the_sweep():
    """Traefik's idleTimeout applies to HTTP/2 connections with no stream open; they get
    GOAWAY(NO_ERROR) first (§6.8)."""
    import time

    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, idle_timeout=5))
    h2c.entry.sweep()
    assert not h2c.transport.closed
    h2c.server.idle_since = time.perf_counter() - 6
    h2c.entry.sweep()
    assert h2c.transport.closed
    assert goaway_code(h2c.receive()) == ErrorCodes.NO_ERROR


async def test_a_request_body_past_the_read_timeout_gets_408():
    """Traefik's readTimeout covers a whole request: a stream whose body is still arriving
    after it gets 408 (RFC 9110 §15.5.9) and its backend connection is closed."""
    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, read_timeout=5))
    upstream = h2c.add_upstream()
    sid = h2c.request(request_headers(b"/", b"POST"), b"part", end=False)
    h2c.exchange()
    await asyncio.sleep(0)
    h2c.server.streams[sid].ex.started_at -= 6
    h2c.entry.sweep()
    events = h2c.receive()
    assert status_of(events, sid) == b"408" and upstream.closed


# -- limits -----------------------------------------------------------------------------------


async def test_streams_beyond_max_concurrent_streams_are_refused():
    """§5.1.2: a stream past SETTINGS_MAX_CONCURRENT_STREAMS is a stream error; REFUSED_STREAM
    says it was not processed (§8.7), and the others go on."""
    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, h2_max_concurrent_streams=2))
    h2c.client.remote_settings = h2.settings.Settings(client=False)  # a client that did not wait
    for _ in range(2):
        h2c.add_upstream()
    ids = [h2c.request(request_headers(b"/%d" % i)) for i in range(3)]
    events = h2c.exchange()
    assert reset_code(events, ids[2]) == ErrorCodes.REFUSED_STREAM
    h2c.backend_sends(OK_2, 0)
    h2c.backend_sends(OK_2, 1)
    assert body_of(h2c.events, ids[0]) == body_of(h2c.events, ids[1]) == b"ok"
    assert len(h2c.conv.upstreams) == 2


async def test_settings_advertise_the_configured_limits():
    """The SETTINGS frame carries the entrypoint's limits (Traefik's maxConcurrentStreams,
    maxDecoderHeaderTableSize; our initialWindowSize, maxHeaderListSize) and RFC 8441's
    ENABLE_CONNECT_PROTOCOL."""
    settings = EntryPointSettings(
        name="web",
        port=5000,
        h2_max_concurrent_streams=7,
        h2_initial_window_size=100_000,
        h2_max_header_list_size=9000,
        h2_max_decoder_table_size=1024,
    )
    h2c = H2Conversation(settings)
    (changed,) = of(h2c.events, h2.events.RemoteSettingsChanged)
    values = {code: c.new_value for code, c in changed.changed_settings.items()}
    codes = h2.settings.SettingCodes
    assert values[codes.MAX_CONCURRENT_STREAMS] == 7
    assert values[codes.INITIAL_WINDOW_SIZE] == 100_000
    assert values[codes.MAX_HEADER_LIST_SIZE] == 9000
    assert values[codes.HEADER_TABLE_SIZE] == 1024
    assert values[codes.ENABLE_CONNECT_PROTOCOL] == 1


async def test_a_header_list_over_the_limit_gets_431_on_its_stream():
    """RFC 9113 §10.5.1, as Go's server: a field block over MAX_HEADER_LIST_SIZE is decoded
    (the HPACK state stays whole) and answered 431; nothing is forwarded and the connection
    serves the next stream."""
    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, max_header_bytes=4096))
    upstream = h2c.add_upstream()
    sid = h2c.request(request_headers(x_big=b"v" * 5000))
    events = h2c.exchange()
    assert status_of(events, sid) == b"431" and upstream.take() == b""
    other = h2c.request(request_headers(b"/next"))
    h2c.exchange()
    h2c.backend_sends(OK_2)
    assert body_of(h2c.events, other) == b"ok"


async def test_a_header_list_far_over_the_limit_is_a_connection_error():
    """RFC 9113 §10.5.1: past twice the advertised limit hpack stops decoding, which leaves
    no consistent HPACK state: GOAWAY(ENHANCE_YOUR_CALM)."""
    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, max_header_bytes=4096))
    upstream = h2c.add_upstream()
    h2c.request(request_headers(x_big=b"v" * 9000))
    events = h2c.exchange()
    assert goaway_code(events) == ErrorCodes.ENHANCE_YOUR_CALM
    assert h2c.transport.closed and upstream.take() == b""


# -- bad input -----------------------------------------------------------------------------


def _stream_error_case(headers: list, body: bytes | None = None) -> tuple[H2Conversation, int]:
    h2c = H2Conversation(validate=False)
    upstream = h2c.add_upstream()
    sid = h2c.request(headers, body)
    h2c.exchange()
    assert upstream.take() == b"", "a malformed request must never be forwarded"
    return h2c, sid


async def test_malformed_requests_get_rst_stream_protocol_error_and_others_go_on():
    """§8.1.1, §8.2, §8.3: uppercase field names, connection-specific fields, `te` other
    than trailers, missing or unknown or duplicated pseudo-header fields, an empty or
    non-origin :path: a stream error PROTOCOL_ERROR for that stream only, nothing forwarded,
    and the next stream on the connection is served."""
    base = request_headers()
    cases = {
        "uppercase name": base + [(b"X-Upper", b"1")],
        "connection field": base + [(b"connection", b"keep-alive")],
        "transfer-encoding": base + [(b"transfer-encoding", b"chunked")],
        "te not trailers": base + [(b"te", b"gzip")],
        "missing :path": [f for f in base if f[0] != b":path"],
        "missing :method": [f for f in base if f[0] != b":method"],
        "unknown pseudo": base + [(b":foo", b"x")],
        "pseudo after regular": [*base[:3], (b"accept", b"*/*"), base[3]],
        "duplicate :path": [*base, (b":path", b"/again")],
        "empty :path": [*base[:3], (b":path", b"")],
        "absolute :path": [*base[:3], (b":path", b"http://a.test/")],
        "no authority": [f for f in base if f[0] != b":authority"],
        "value with CR": base + [(b"x-a", b"a\rb")],
        "content-length without data": request_headers(b"/", b"POST", content_length=b"3"),
    }
    for name, headers in cases.items():
        h2c, sid = _stream_error_case(headers)
        assert reset_code(h2c.events, sid) == ErrorCodes.PROTOCOL_ERROR, name
        assert not of(h2c.events, h2.events.ConnectionTerminated), name
        h2c.add_upstream()
        other = h2c.request(request_headers(b"/next"))
        h2c.exchange()
        h2c.backend_sends(OK_2)
        assert body_of(h2c.events, other) == b"ok", name


async def test_content_length_disagreeing_with_data_is_a_stream_error():
    """§8.1.1: a content-length that the DATA frames contradict makes the request malformed:
    RST_STREAM(PROTOCOL_ERROR); the body never ends at the backend as if whole (its connection
    is closed), and the connection window is handed back so other streams go on."""
    for sent in (b"toolong", b"ab"):
        h2c = H2Conversation(validate=False)
        upstream = h2c.add_upstream()
        sid = h2c.request(request_headers(b"/", b"POST", content_length=b"5"), sent)
        events = h2c.exchange()
        await asyncio.sleep(0)
        events += h2c.exchange()
        assert reset_code(h2c.events, sid) == ErrorCodes.PROTOCOL_ERROR
        assert not of(h2c.events, h2.events.ConnectionTerminated)
        forwarded = upstream.take()
        assert forwarded == b"" or upstream.closed
        h2c.add_upstream()
        other = h2c.request(request_headers(b"/next"))
        h2c.exchange()
        h2c.backend_sends(OK_2)
        assert body_of(h2c.events, other) == b"ok"


async def test_requests_http11_would_refuse_get_the_same_status_on_their_stream():
    """The HTTP/1.1 checks where they make sense: an invalid authority or a fragment (400),
    a target over maxRequestTargetBytes (414), CONNECT without RFC 8441's :protocol (501), an
    Expect other than 100-continue (417). Nothing is forwarded."""
    cases = [
        ([*request_headers()[:2], (b":authority", b"a b"), (b":path", b"/")], b"400"),
        (request_headers(b"/x#frag"), b"400"),
        (request_headers(b"/" + b"a" * 20000), b"414"),
        (request_headers(b"/%zz"), b"400"),
        (request_headers(expect=b"nothing"), b"417"),
        ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], b"501"),
    ]
    for headers, status in cases:
        h2c, sid = _stream_error_case(headers)
        assert status_of(h2c.events, sid) == status, headers


async def test_connection_errors_get_goaway_with_the_right_code():
    """§3.4 a bad preface, §4.2 a frame over SETTINGS_MAX_FRAME_SIZE (FRAME_SIZE_ERROR),
    §5.1.1 a stream ID lower than one already used (PROTOCOL_ERROR): GOAWAY, the connection
    closes, nothing forwarded."""
    # a bad preface (reached through the h2c upgrade; the sniffer only hands over a good one)
    conv = conversation()
    server = H2ServerConnection(conv.entry)
    transport = MemoryTransport(("127.0.0.7", 1))
    server.connection_made(transport)  # type: ignore[arg-type]
    server.data_received(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    client = _Client(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    assert goaway_code(client.receive_data(bytes(transport.written))) == ErrorCodes.PROTOCOL_ERROR
    assert transport.closed
    # the magic string, but not followed by SETTINGS (§3.4: the preface includes it)
    server = H2ServerConnection(conv.entry)
    transport = MemoryTransport(("127.0.0.7", 2))
    server.connection_made(transport)  # type: ignore[arg-type]
    server.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")
    assert not transport.closed  # not known yet
    server.data_received(b"\x08\x06\x00\x00\x00\x00\x0012345678")  # a PING
    client = _Client(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    assert goaway_code(client.receive_data(bytes(transport.written))) == ErrorCodes.PROTOCOL_ERROR
    assert transport.closed

    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    oversized = DataFrame(1, data=b"x" * 20000)
    events = h2c.exchange(oversized.serialize())
    assert goaway_code(events) == ErrorCodes.FRAME_SIZE_ERROR and h2c.transport.closed

    h2c = H2Conversation(validate=False)
    upstream = h2c.add_upstream()
    h2c.client.send_headers(5, request_headers(), end_stream=True)
    h2c.exchange()
    upstream.take()
    h2c.client.highest_outbound_stream_id = 1
    h2c.client.send_headers(3, request_headers(b"/back"), end_stream=True)
    events = h2c.exchange()
    assert goaway_code(events) == ErrorCodes.PROTOCOL_ERROR and h2c.transport.closed
    assert upstream.take() == b""


# -- gRPC ---------------------------------------------------------------------------------------


async def test_a_grpc_response_broken_after_it_started_ends_with_grpc_status_trailers():
    """Issue 11: a gRPC stream that breaks after its response started ends with grpc-status
    UNAVAILABLE (14) and a grpc-message in trailers, not a bare RST_STREAM."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(
        request_headers(b"/pkg.Svc/M", b"POST", content_type=b"application/grpc", te=b"trailers"),
        b"\x00\x00\x00\x00\x00",
    )
    h2c.exchange()
    await asyncio.sleep(0)
    h2c.backend_sends(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n5\r\n\x00\x00\x00\x00\x00\r\n"
    )
    h2c.conv.upstreams[0][0].connection_lost(ConnectionResetError())
    events = h2c.receive()
    (trailers,) = of(h2c.events, h2.events.TrailersReceived, sid)
    fields = dict(trailers.headers)
    assert fields[b"grpc-status"] == b"14" and fields[b"grpc-message"]
    assert not of(events, h2.events.StreamReset)
    assert body_of(h2c.events, sid) == b"\x00\x00\x00\x00\x00"  # the message sent before


async def test_a_grpc_call_refused_before_routing_gets_a_trailers_only_status():
    """gRPC over HTTP/2 (PROTOCOL-HTTP2.md, Trailers-Only): a call refused for the client's
    own error (broken percent-encoding in :path: 400, as on HTTP/1.1) gets :status 200 and
    grpc-status INTERNAL (13) with END_STREAM on the HEADERS frame; nothing forwarded."""
    h2c, sid = _stream_error_case(
        request_headers(b"/pkg.S/M%zz", b"POST", content_type=b"application/grpc")
    )
    (response,) = of(h2c.events, h2.events.ResponseReceived, sid)
    fields = dict(response.headers)
    assert fields[b":status"] == b"200" and fields[b"grpc-status"] == b"13"
    assert fields[b"grpc-message"] == b"400 Bad Request"
    assert response.stream_ended is not None


async def test_a_broken_plain_response_is_reset_with_internal_error():
    """§5.4.2: a response that cannot be completed ends its stream with RST_STREAM
    (INTERNAL_ERROR); the connection and its other streams go on."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(request_headers())
    h2c.exchange()
    h2c.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h2c.conv.upstreams[0][0].connection_lost(None)
    events = h2c.receive()
    assert reset_code(events, sid) == ErrorCodes.INTERNAL_ERROR
    assert not h2c.transport.closed


# -- h2c upgrade (RFC 7540 §3.2) ------------------------------------------------------------

H2C_HEAD = (
    b"Host: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)


def _upgraded_client() -> h2.connection.H2Connection:
    client = _Client(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_upgrade_connection()
    return client


async def test_h2c_upgrade_with_a_body_is_served_as_http11():
    """RFC 7540 §3.2 wants a request's whole body before the client's preface, which
    deadlocks with `Expect: 100-continue` and races a client that switches on the 101
    mid-body; so, as nghttpx, the proxy ignores the upgrade of a request with a body and
    serves it as HTTP/1.1 (RFC 9110 §7.8: a server may ignore Upgrade). llhttp skips an
    upgrade request's body: the proxy reads it by its Content-Length (RFC 9112 §6.3), in
    pieces, then the next request on the connection; nothing of the upgrade is forwarded."""
    conv = conversation()
    _, second = conv.add_upstream()  # the pipelined request's (the first is busy till done)
    _, upstream = conv.add_upstream()
    answer = conv.send(b"POST /up HTTP/1.1\r\n" + H2C_HEAD + b"Content-Length: 5\r\n\r\nhel")
    assert answer == b""  # no 101: the body is still coming
    conv.send(b"lo" + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0)  # a request with a body is handled once the read is parsed
    sent = upstream.take()
    assert sent.startswith(b"POST /up HTTP/1.1") and sent.endswith(b"\r\n\r\nhello")
    assert b"upgrade" not in sent.lower() and b"http2-settings" not in sent.lower()
    answered = conv.backend_sends(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert answered.startswith(b"HTTP/1.1 201 ")
    await asyncio.sleep(0)
    assert (upstream.take() + second.take()).startswith(b"GET /next HTTP/1.1")
    index = 0 if conv.upstreams[0][0].ex is not None else -1
    answered = conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", index)
    assert answered.startswith(b"HTTP/1.1 200 ") and answered.endswith(b"ok")


async def test_h2c_upgrades_the_proxy_does_not_make():
    """RFC 9110 §7.8 and RFC 7540 §3.2.1: no upgrade in HTTP/1.0 or without a valid
    HTTP2-Settings named by Connection (served as HTTP/1.1); a chunked body before the
    switch cannot be framed by llhttp: 501. Never forwarded."""
    cases = [
        (b"GET / HTTP/1.0\r\n" + H2C_HEAD + b"\r\n", b"HTTP/1.1 200 "),
        (
            b"GET / HTTP/1.1\r\n" + H2C_HEAD.replace(b"AAMAAABkAAQAAP__", b"AAMA") + b"\r\n",
            b"HTTP/1.1 200 ",
        ),
        (
            b"GET / HTTP/1.1\r\n"
            + H2C_HEAD.replace(b"Upgrade, HTTP2-Settings", b"Upgrade")
            + b"\r\n",
            b"HTTP/1.1 200 ",
        ),
        (
            b"POST / HTTP/1.1\r\n"
            + H2C_HEAD
            + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            b"HTTP/1.1 501 ",
        ),
    ]
    for raw, expected in cases:
        conv = conversation()
        _, upstream = conv.add_upstream()
        answer = conv.send(raw)
        if expected == b"HTTP/1.1 200 ":
            _, fields = head_of(upstream.take())
            assert b"upgrade" not in fields and fields.get(b"connection") is None, raw
            answer += conv.backend_sends(OK_2)
        assert answer.startswith(expected), raw


# -- WebSocket over HTTP/2 (RFC 8441) ---------------------------------------------------------


def _connect_headers(path: bytes = b"/chat") -> list:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", b"a.test"),
        (b":path", path),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat"),
    ]


async def test_extended_connect_becomes_a_websocket_handshake_and_a_tunnel():
    """RFC 8441 §4-5: an extended CONNECT with :protocol websocket reaches the HTTP/1.1
    backend as a WebSocket handshake (GET, Upgrade, a key of the proxy's, the client's
    version and subprotocol); its 101 becomes :status 200 (no Sec-WebSocket-Accept), and the
    stream's DATA and the backend socket are one byte pipe, both ways; other streams on the
    connection go on."""
    from wsproto.utilities import generate_accept_token

    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    sid = h2c.request(_connect_headers(), end=False)
    h2c.client.send_data(sid, b"early")  # before the answer: held, never lost
    h2c.exchange()
    line, fields = head_of(upstream.take())
    assert line == b"GET /chat HTTP/1.1"
    assert fields[b"upgrade"] == b"websocket" and fields[b"connection"] == b"Upgrade"
    assert (
        fields[b"sec-websocket-version"] == b"13" and fields[b"sec-websocket-protocol"] == b"chat"
    )
    key = fields[b"sec-websocket-key"]
    events = h2c.backend_sends(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n\r\nfrom-backend"
    )
    await asyncio.sleep(0)
    events += h2c.receive()
    (response,) = of(events, h2.events.ResponseReceived, sid)
    answer = dict(response.headers)
    assert answer[b":status"] == b"200" and answer[b"sec-websocket-protocol"] == b"chat"
    assert b"sec-websocket-accept" not in answer and b"upgrade" not in answer
    assert body_of(h2c.events, sid) == b"from-backend"
    assert upstream.take() == b"early"
    h2c.client.send_data(sid, b"from-client")
    h2c.exchange()
    assert upstream.take() == b"from-client"
    upstream.protocol.data_received(b"more")
    h2c.receive()
    assert body_of(h2c.events, sid) == b"from-backendmore"
    assert len(h2c.entry.tunnels) == 1
    # the backend closes: the stream ends (END_STREAM), the client's side too, both closed
    upstream.protocol.eof_received()
    h2c.receive()
    assert of(h2c.events, h2.events.StreamEnded, sid)
    h2c.client.end_stream(sid)
    h2c.exchange()
    await asyncio.sleep(0)
    assert upstream.closed
    upstream.protocol.connection_lost(None)
    await asyncio.sleep(0)
    assert h2c.entry.tunnels == set() and sid not in h2c.server.streams


async def test_a_refused_websocket_handshake_gets_its_status_and_the_connection_goes_on():
    """Issue 11, bad input: an extended CONNECT whose backend refuses the upgrade gets that
    status on its stream; the connection keeps serving other streams."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(_connect_headers(), end=False)
    h2c.exchange()
    events = h2c.backend_sends(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert status_of(events, sid) == b"403" and body_of(events, sid) == b"no"
    h2c.add_upstream()
    other = h2c.request(request_headers(b"/next"))
    h2c.exchange()
    h2c.backend_sends(OK_2)
    assert body_of(h2c.events, other) == b"ok"
    assert not h2c.transport.closed and h2c.entry.tunnels == set()


async def test_a_websocket_backend_answering_2xx_instead_of_101_gets_502():
    """RFC 8441 §5: a 2xx to an extended CONNECT means the tunnel is open. A backend that
    ignored the bridged WebSocket handshake and answered 200 with a body opened none (the
    client would read the body as WebSocket frames: fresh tester F6): the stream gets 502,
    the body is not relayed; other statuses are relayed as they are (above)."""
    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(_connect_headers(), end=False)
    h2c.exchange()
    events = h2c.backend_sends(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{"a": 12}'
    )
    assert status_of(events, sid) == b"502"
    assert body_of(events, sid) == b"Bad Gateway"
    assert of(events, h2.events.StreamEnded, sid)
    assert not h2c.transport.closed


async def test_a_slow_websocket_client_pauses_the_backend_socket():
    """RFC 9113 §5.2 through the pipe: bytes the stream's window cannot take are queued, and
    past the adapter's high-water mark the backend socket is no longer read; the client's
    WINDOW_UPDATE resumes it."""
    from wsproto.utilities import generate_accept_token

    from meshproxy.http2.stream_tunnel import WRITE_HIGH_WATER

    h2c = H2Conversation(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    upstream = h2c.add_upstream()
    sid = h2c.request(_connect_headers(), end=False)
    h2c.exchange()
    _, fields = head_of(upstream.take())
    h2c.backend_sends(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + generate_accept_token(fields[b"sec-websocket-key"])
        + b"\r\n\r\n"
    )
    await asyncio.sleep(0)
    upstream.protocol.data_received(b"x" * (WRITE_HIGH_WATER + 1000))
    h2c.receive()
    assert len(body_of(h2c.events, sid)) == 100
    assert not upstream.reading
    h2c.client.increment_flow_control_window(2 * WRITE_HIGH_WATER, stream_id=sid)
    h2c.client.increment_flow_control_window(2 * WRITE_HIGH_WATER)
    h2c.exchange()
    assert upstream.reading
    assert len(body_of(h2c.events, sid)) == WRITE_HIGH_WATER + 1000


async def test_a_stalled_exchange_ends_but_a_quiet_grpc_stream_does_not():
    """Traefik's idleTimeout for an exchange that makes no progress either way (504 before
    its response, as on HTTP/1.1); a gRPC stream may be quiet for long (a watch): its
    deadline bounds it, as in Go's server, which has no per-stream idle limit."""
    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, idle_timeout=5))
    plain_upstream = h2c.add_upstream()
    plain = h2c.request(request_headers(b"/plain"))
    h2c.exchange()
    h2c.add_upstream()
    grpc = h2c.request(
        request_headers(b"/pkg.S/Watch", b"POST", content_type=b"application/grpc"),
        b"\x00\x00\x00\x00\x00",
    )
    h2c.exchange()
    await asyncio.sleep(0)
    h2c.entry.sweep()  # the first look records the progress counters
    for stream in h2c.server.streams.values():
        stream.stalled_since -= 6
    h2c.entry.sweep()
    events = h2c.receive()
    assert status_of(events, plain) == b"504" and plain_upstream.closed
    assert grpc in h2c.server.streams and not of(events, h2.events.StreamReset, grpc)


async def test_a_client_that_does_not_read_is_not_read_either():
    """CVE-2019-9512/9515 (PING and SETTINGS floods): every PING and SETTINGS needs an
    acknowledgement; while the client's socket buffer is full (it does not read) the
    connection stops reading it, so acknowledgements cannot pile up without bound; its
    upstreams pause too; both resume with the socket."""
    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    h2c.request(request_headers())
    h2c.exchange()
    h2c.server.pause_writing()
    assert not h2c.transport.reading and not upstream.reading
    h2c.server.resume_writing()
    assert h2c.transport.reading and upstream.reading


async def test_data_after_an_early_answer_or_a_refusal_costs_nothing_but_a_reset():
    """§8.1: a complete response before the whole request ends the stream with
    RST_STREAM(NO_ERROR); DATA, WINDOW_UPDATE or trailers the client had in flight then, or
    for a refused stream, are not a connection error (§5.1: frames on a stream we reset are
    ignored; §6.9: DATA still counts against the connection window, which is handed back, so
    the other streams keep flowing)."""
    dynamic = {
        "http": {
            "routers": {"r": {"entryPoints": ["web"], "service": "s", "rule": "Path(`/ok`)"}},
            "services": {"s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:9"}]}}},
        }
    }
    settings = EntryPointSettings(name="web", port=5000, h2_max_concurrent_streams=1)
    h2c = H2Conversation(settings, dynamic)
    h2c.client.remote_settings = h2.settings.Settings(client=False)  # a client that did not wait
    early = h2c.request(request_headers(b"/nowhere", b"POST"), b"a" * 1000, end=False)
    refused = h2c.request(request_headers(b"/ok", b"POST"), b"b" * 1000, end=False)
    h2c.exchange()
    await asyncio.sleep(0)
    events = h2c.exchange()
    assert status_of(h2c.events, early) == b"404"
    assert reset_code(h2c.events, early) == ErrorCodes.NO_ERROR
    assert reset_code(h2c.events, refused) == ErrorCodes.REFUSED_STREAM
    # More than the whole connection window (1 MiB) on the two dead streams, as frames the
    # client had in flight: only if the server hands that window back is it no violation.
    for index in range(70):
        sid = (early, refused)[index % 2]
        h2c.client._data_to_send += DataFrame(sid, data=b"c" * 16000).serialize()
        events += h2c.exchange()
    for sid in (early, refused):  # other frames in flight on them: a stream error at most
        update = WindowUpdateFrame(sid)
        update.window_increment = 100
        trailers = HeadersFrame(sid, flags=["END_STREAM", "END_HEADERS"])
        trailers.data = h2c.client.encoder.encode([(b"x-t", b"1")])
        events += h2c.exchange(update.serialize() + trailers.serialize())
    assert not of(events, h2.events.ConnectionTerminated) and not h2c.transport.closed
    assert any(e.stream_id == 0 for e in of(events, h2.events.WindowUpdated))
    h2c.add_upstream()
    ok = h2c.request(request_headers(b"/ok"))
    h2c.exchange()
    h2c.backend_sends(OK_2)
    assert body_of(h2c.events, ok) == b"ok"


async def test_forwarded_fields_are_trusted_only_from_trusted_ips():
    """Traefik's forwardedHeaders.trustedIPs, as on HTTP/1.1: an untrusted client's
    X-Forwarded-* and X-Real-Ip are replaced by the proxy's; a trusted client's are kept and
    X-Forwarded-For gets the client's address appended."""
    import ipaddress

    sent = request_headers(
        x_forwarded_for=b"10.9.9.9", x_real_ip=b"10.9.9.9", x_forwarded_proto=b"https"
    )
    for trusted, expected_for, expected_proto in (
        ([], b"127.0.0.7", b"http"),
        ([ipaddress.ip_network("127.0.0.0/8")], b"10.9.9.9, 127.0.0.7", b"https"),
    ):
        settings = EntryPointSettings(name="web", port=5000, trusted_networks=trusted)
        h2c = H2Conversation(settings)
        upstream = h2c.add_upstream()
        h2c.request(sent)
        h2c.exchange()
        head = upstream.take().split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        fields: dict[bytes, list[bytes]] = {}
        for line in head:
            name, _, value = line.partition(b": ")
            fields.setdefault(name.lower(), []).append(value)
        assert fields[b"x-forwarded-for"] == [expected_for]
        assert fields[b"x-forwarded-proto"] == [expected_proto]
        assert len(fields[b"x-real-ip"]) == 1


# -- nothing left for the garbage collector (issue 9: no cycles per request or connection) ----


async def test_requests_and_connections_leave_no_cyclic_garbage():
    """Issue 9: with the garbage collector off, HTTP/2 requests (answered, reset by the
    client, answered locally) and whole connections leave no reference cycle behind: the
    exchange and its stream let go of each other, and h2's per-connection handler table
    (bound methods) is dropped when the connection is lost."""
    import gc

    h2c = H2Conversation()

    def requests(count: int) -> None:
        for index in range(count):
            h2c.add_upstream()
            sid = h2c.request(request_headers(b"/x"))
            h2c.exchange()
            if index % 3 == 0:
                h2c.client.reset_stream(sid, ErrorCodes.CANCEL)
                h2c.exchange()
            else:
                h2c.backend_sends(OK_2 if index % 3 == 1 else b"HTTP/1.1 404 X\r\n\r\n")

    def connection() -> None:
        server = H2ServerConnection(h2c.entry)
        transport = MemoryTransport(("127.0.0.9", 1))
        server.connection_made(transport)  # type: ignore[arg-type]
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, request_headers(b"/x"), end_stream=True)
        h2c.add_upstream()
        server.data_received(client.data_to_send())
        h2c.conv.upstreams[-1][0].data_received(OK_2)
        server.connection_lost(None)
        client._frame_dispatch_table = {}  # the test's own client has the same cycle

    requests(10)
    connection()
    await asyncio.sleep(0)
    gc.collect()
    gc.disable()
    try:
        requests(30)
        for _ in range(5):
            connection()
        await asyncio.sleep(0)
        assert gc.collect() == 0
    finally:
        gc.enable()


async def _open_tunnel(h2c: H2Conversation) -> tuple[int, MemoryTransport]:
    from wsproto.utilities import generate_accept_token

    upstream = h2c.add_upstream()
    sid = h2c.request(_connect_headers(), end=False)
    h2c.exchange()
    _, fields = head_of(upstream.take())
    h2c.backend_sends(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + generate_accept_token(fields[b"sec-websocket-key"])
        + b"\r\n\r\n"
    )
    await asyncio.sleep(0)
    h2c.receive()
    assert status_of(h2c.events, sid) == b"200"
    return sid, upstream


async def test_a_client_reset_ends_the_websocket_tunnel():
    """RFC 8441 §5 / RFC 9113 §6.4: RST_STREAM on the tunnel's stream is the client leaving:
    the backend socket is closed and the tunnel forgotten; the connection goes on."""
    h2c = H2Conversation()
    sid, upstream = await _open_tunnel(h2c)
    h2c.client.reset_stream(sid, ErrorCodes.CANCEL)
    h2c.exchange()
    await asyncio.sleep(0)
    assert upstream.closed
    upstream.protocol.connection_lost(None)
    await asyncio.sleep(0)
    assert h2c.entry.tunnels == set() and sid not in h2c.server.streams
    assert not h2c.transport.closed


async def test_shutdown_says_going_away_on_websocket_streams():
    """RFC 6455 §7.4.1, as for HTTP/1.1 WebSockets: a graceful shutdown writes Close 1001 to
    the client (as DATA on its stream) and to the backend, then ends both."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import CloseConnection

    h2c = H2Conversation()
    sid, upstream = await _open_tunnel(h2c)
    h2c.entry.close_tunnels()
    h2c.receive()
    reader = Connection(ConnectionType.CLIENT)
    reader.receive_data(body_of(h2c.events, sid))
    closes = [e for e in reader.events() if isinstance(e, CloseConnection)]
    assert closes and closes[0].code == 1001
    assert of(h2c.events, h2.events.StreamEnded, sid)
    assert upstream.take()[:1] == b"\x88"  # a Close frame to the backend too


async def test_h2c_upgrade_settings_unpadded_or_refused():
    """RFC 7540 §3.2.1: HTTP2-Settings is base64url without its padding (accepted, padded
    too). A value that is not exactly that (characters outside base64url, a comma-joined
    list, a partial setting) or carries settings h2 refuses (RFC 9113 §6.5.2: ENABLE_PUSH 2,
    MAX_FRAME_SIZE under 16384, INITIAL_WINDOW_SIZE 2^31) is no upgrade: the request is served
    as HTTP/1.1 (the fresh tester got 101 then a traceback per request, F15). nghttpx
    likewise answers an unusable HTTP2-Settings without switching."""
    import base64

    def b64(payload: bytes) -> bytes:
        return base64.urlsafe_b64encode(payload).rstrip(b"=")

    good = b64(b"\x00\x03\x00\x00\x00\x64")
    for value, upgraded in (
        (good, True),
        (good + b"==", True),
        (b64(b"\x00\x02\x00\x00\x00\x02"), False),  # ENABLE_PUSH 2
        (b64(b"\x00\x05\x00\x00\x00\x01"), False),  # MAX_FRAME_SIZE 1
        (b64(b"\x00\x04\x80\x00\x00\x00"), False),  # INITIAL_WINDOW_SIZE 2^31
        (b"!!!!", False),
        (good + b"," + good, False),
        (b64(b"\x00\x03\x00"), False),
    ):
        conv = conversation()
        _, upstream = conv.add_upstream()
        head = H2C_HEAD.replace(b"AAMAAABkAAQAAP__", value)
        answer = conv.send(b"GET /s HTTP/1.1\r\n" + head + b"\r\n")
        line, fields = head_of(upstream.take())
        assert line == b"GET /s HTTP/1.1", value
        assert b"upgrade" not in fields and b"http2-settings" not in fields, value
        if upgraded:
            assert answer.startswith(b"HTTP/1.1 101 "), value
        else:
            assert answer == b"", value
            answer = conv.backend_sends(OK_2)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok"), value
            assert not conv.client_transport.closed


async def test_a_reset_in_the_same_read_as_what_would_make_us_write():
    """RFC 9113 §6.4, §5.1: h2 closes a stream at the client's RST_STREAM before the other
    frames of the same read are handled. A stream opened and reset in one read is never
    routed (it counts towards the rapid-reset bound); a queued response whose window opens
    in the same read as its stream's reset is dropped; nothing raises, other streams go on."""
    h2c = H2Conversation(
        dynamic={  # every request below: a local 404
            "http": {
                "routers": {"r": {"entryPoints": ["web"], "service": "s", "rule": "Path(`/x`)"}},
                "services": {"s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:9"}]}}},
            }
        },
        client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10},
    )
    sid = h2c.request(request_headers(b"/gone"))
    h2c.client.reset_stream(sid, ErrorCodes.CANCEL)
    events = h2c.exchange()
    assert not of(events, h2.events.ResponseReceived, sid) and h2c.server.opened == 1
    assert h2c.server.premature_resets == 1
    queued = h2c.request(request_headers(b"/queued"))  # its 404 body waits for the window
    h2c.exchange()
    assert h2c.server.streams[queued].pending
    h2c.client.increment_flow_control_window(1000, stream_id=queued)
    h2c.client.reset_stream(queued, ErrorCodes.CANCEL)
    events = h2c.exchange()
    assert queued not in h2c.server.streams and not h2c.transport.closed
    other = h2c.request(request_headers(b"/other"))
    h2c.client.increment_flow_control_window(1000, stream_id=other)
    h2c.exchange()
    assert status_of(h2c.events, other) == b"404"


async def test_interim_responses_are_relayed():
    """RFC 9113 §8.1: a response may start with any number of 1xx HEADERS: a backend's 103
    Early Hints and its 100 Continue (for a request that carried Expect: 100-continue, RFC
    9110 §10.1.1) reach the client before the final response."""
    h2c = H2Conversation()
    upstream = h2c.add_upstream()
    sid = h2c.request(request_headers(b"/up", b"PUT", expect=b"100-continue"), end=False)
    h2c.exchange()
    await asyncio.sleep(0)
    _, fields = head_of(upstream.take())
    assert fields[b"expect"] == b"100-continue"
    h2c.backend_sends(b"HTTP/1.1 100 Continue\r\n\r\n")
    h2c.backend_sends(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
    h2c.client.send_data(sid, b"body", end_stream=True)
    h2c.exchange()
    h2c.backend_sends(OK_2)
    informational = of(h2c.events, h2.events.InformationalResponseReceived, sid)
    assert [dict(e.headers)[b":status"] for e in informational] == [b"100", b"103"]
    assert dict(informational[1].headers)[b"link"] == b"</s.css>; rel=preload"
    assert status_of(h2c.events, sid) == b"200"


# -- floods and bounded work (CVE-2019-9512/9515/9518, CVE-2023-44487, CVE-2024-27316) -------


def raw_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each frame in `data` (the server's output, read without
    a client state machine: a flood's answers would trip h2's own checks)."""
    frames = []
    view = memoryview(data)
    while len(view) >= 9:
        length = int.from_bytes(view[:3], "big")
        kind, stream_id = view[3], int.from_bytes(view[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, stream_id, bytes(view[9 : 9 + length])))
        view = view[9 + length :]
    return frames


def goaway_of(frames: list[tuple[int, int, bytes]]) -> tuple[int, int] | None:
    """(last stream id, error code) of the first GOAWAY in `frames`."""
    for kind, _, payload in frames:
        if kind == 0x7:
            return int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")
    return None


async def drain_turns(server: H2ServerConnection, turns: int = 1000) -> None:
    """Let the loop run the server's later turns until h2's buffer is empty (bounded)."""
    for _ in range(turns):
        if not server._backlog or server.closed:
            return
        await asyncio.sleep(0)


_FLOODS = {
    "ping": PingFrame(0, opaque_data=b"12345678").serialize(),
    "settings": SettingsFrame(0).serialize(),
    "priority": PriorityFrame(1, depends_on=0, stream_weight=7).serialize(),
    "window_update": WindowUpdateFrame(0, window_increment=1).serialize(),
    "unknown_type": b"\x00\x00\x00\x20\x00\x00\x00\x00\x00",  # type 0x20, RFC 9113 §4.1
    "empty_data": DataFrame(1, data=b"").serialize(),
}


@pytest.mark.parametrize("kind", sorted(_FLOODS))
async def test_a_flood_of_frames_without_progress_gets_goaway_enhance_your_calm(kind: str):
    """CVE-2019-9512 (PING), -9515 (SETTINGS), -9516/-9518 (empty DATA), -9513 (PRIORITY),
    unknown frame types (RFC 9113 §4.1: ignored, but each costs a parse) and WINDOW_UPDATE
    floods: past FLOOD_FRAMES frames that carry no request progress the connection gets
    GOAWAY(ENHANCE_YOUR_CALM) and is closed (Envoy: max_outbound_control_frames 1000,
    max_consecutive_inbound_frames_with_empty_payload; Go: its control-frame budget). The
    frames already read are handled at most FRAMES_PER_TURN per loop turn."""
    from meshproxy.http2.server import FLOOD_FRAMES

    h2c = H2Conversation()
    h2c.add_upstream()
    sid = h2c.request(request_headers(b"/up", b"POST"), body=b"x", end=False)
    h2c.exchange()
    assert sid == 1 and 1 in h2c.server.streams
    h2c.transport.take()
    h2c.server.data_received(_FLOODS[kind] * (FLOOD_FRAMES + 500))
    await drain_turns(h2c.server)
    out = raw_frames(h2c.transport.take())
    assert h2c.transport.closed
    assert goaway_of(out) == (1, ErrorCodes.ENHANCE_YOUR_CALM)
    answered = [f for f in out if f[0] in (0x4, 0x6)]  # SETTINGS / PING acknowledgements
    assert len(answered) <= FLOOD_FRAMES + 1


async def test_a_flood_of_streams_refused_past_max_concurrent_streams_is_cut():
    """§5.1.2 refuses a stream past MAX_CONCURRENT_STREAMS (REFUSED_STREAM), but each costs
    an HPACK decode and a reset for nothing (the fresh tester saw 13,500 in 5 s): refused
    streams count against the same budget, so the connection gets GOAWAY(ENHANCE_YOUR_CALM)."""
    from meshproxy.http2.server import FLOOD_FRAMES

    h2c = H2Conversation(EntryPointSettings(name="web", port=5000, h2_max_concurrent_streams=1))
    h2c.client.remote_settings = h2.settings.Settings(client=False)  # a client that did not wait
    h2c.add_upstream()
    h2c.request(request_headers(b"/hang"))
    for _ in range(FLOOD_FRAMES + 200):
        h2c.request(request_headers(b"/refused"))
    data = h2c.client.data_to_send()
    h2c.server.data_received(data)
    await drain_turns(h2c.server)
    out = raw_frames(h2c.transport.take())
    resets = [f for f in out if f[0] == 0x3]
    assert h2c.transport.closed
    last, code = goaway_of(out) or (0, 0)
    assert code == ErrorCodes.ENHANCE_YOUR_CALM
    assert FLOOD_FRAMES - 10 <= len(resets) <= FLOOD_FRAMES + 1
    assert len(h2c.conv.upstreams) == 1  # only the one stream admitted was forwarded


async def test_keepalives_and_window_updates_with_requests_stay_within_the_budget():
    """The budget is for frames *without* progress: a client that sends a PING and a
    WINDOW_UPDATE with each of many requests (a gRPC client's keepalives, a downloader's
    window) is never cut, each request earning FLOOD_CREDIT_PER_REQUEST frames (nginx sizes
    its flood check on the payload received, Envoy per DATA frame sent)."""
    from meshproxy.http2.server import FLOOD_FRAMES

    dynamic = copy.deepcopy(CATCH_ALL)
    dynamic["http"]["routers"]["r"]["rule"] = "Host(`elsewhere.test`)"
    h2c = H2Conversation(dynamic=dynamic)  # no router for a.test: 404 answered locally
    for round_ in range(6):  # 6 x 200 requests, 2,400 frames without progress in all
        for _ in range(200):
            h2c.request(request_headers(b"/nothing"))
            h2c.client.ping(b"keepaliv")
            h2c.client.increment_flow_control_window(1)
        h2c.server.data_received(h2c.client.data_to_send())
        await drain_turns(h2c.server)
        events = h2c.receive()
        assert not h2c.transport.closed, round_
        assert not of(events, h2.events.ConnectionTerminated)
        assert len(of(events, h2.events.ResponseReceived)) == 200  # every 404
    assert FLOOD_FRAMES < 6 * 200 * 2


async def test_one_read_is_handled_a_bounded_number_of_frames_per_loop_turn():
    """One connection may not hold the event loop for a whole read of cheap frames: h2 gets
    at most FRAMES_PER_TURN frames per turn, the client is not read meanwhile, the rest is
    handled in the following turns (nginx bounds its per-iteration work the same way)."""
    from meshproxy.http2.server import FRAMES_PER_TURN

    h2c = H2Conversation()
    h2c.transport.take()
    h2c.server.data_received(_FLOODS["ping"] * (3 * FRAMES_PER_TURN))
    first = raw_frames(h2c.transport.take())
    assert len(first) == FRAMES_PER_TURN
    assert not h2c.transport.reading and h2c.server._backlog
    await drain_turns(h2c.server)
    rest = raw_frames(h2c.transport.take())
    assert len(rest) == 2 * FRAMES_PER_TURN
    assert h2c.transport.reading and not h2c.server._backlog


async def test_rapid_reset_in_one_read_is_stopped_within_a_turn():
    """CVE-2023-44487 sent as one large write (HEADERS + RST_STREAM pairs): the rapid-reset
    check runs every FRAMES_PER_TURN frames, not once per read, so the connection is cut
    after about RAPID_RESET_MIN_STREAMS streams (the fresh tester saw 550-1000)."""
    from meshproxy.http2.server import FRAMES_PER_TURN, RAPID_RESET_MIN_STREAMS

    h2c = H2Conversation()
    for _ in range(1500):
        sid = h2c.request(request_headers())
        h2c.client.reset_stream(sid, ErrorCodes.CANCEL)
    h2c.server.data_received(h2c.client.data_to_send())
    await drain_turns(h2c.server)
    out = raw_frames(h2c.transport.take())
    assert h2c.transport.closed
    last, code = goaway_of(out) or (0, 0)
    assert code == ErrorCodes.ENHANCE_YOUR_CALM
    assert (last + 1) // 2 <= RAPID_RESET_MIN_STREAMS + FRAMES_PER_TURN // 2
    assert h2c.conv.upstreams == []


async def test_a_header_block_still_arriving_is_bounded_near_the_header_list_limit():
    """CVE-2024-27316 class (CONTINUATION): h2 alone keeps up to 64 CONTINUATION frames of a
    block before decoding it (~1 MiB per connection at the default frame size). The block's
    bytes are capped at twice the advertised MAX_HEADER_LIST_SIZE (what the HPACK decoder
    accepts): beyond, GOAWAY(ENHANCE_YOUR_CALM) (RFC 9113 §10.5.1). Go decodes as frames
    arrive and fails at its limit; nginx caps the buffered block at its header buffer."""
    settings = EntryPointSettings(name="web", port=5000, h2_max_header_list_size=16384)
    h2c = H2Conversation(settings)
    h2c.transport.take()
    h2c.server.data_received(HeadersFrame(1, data=b"\x00" * 16000).serialize())
    h2c.server.data_received(ContinuationFrame(1, data=b"\x00" * 16000).serialize())
    assert not h2c.transport.closed  # 32,000 bytes: within 2 x 16,384
    assert h2c.server.header_block.pending == 32000
    h2c.server.data_received(ContinuationFrame(1, data=b"\x00" * 1000).serialize())
    assert h2c.transport.closed
    assert goaway_of(raw_frames(h2c.transport.take())) == (0, ErrorCodes.ENHANCE_YOUR_CALM)


async def test_malformed_content_length_and_open_trailers_are_stream_errors():
    """RFC 9113 §8.1.1: a malformed request is a stream error: `content-length: abc`, two
    different content-length values (RFC 9110 §8.6) and a trailing HEADERS without END_STREAM
    (§8.1: trailers end the stream) get RST_STREAM(PROTOCOL_ERROR) on their stream, nothing
    forwarded, and the connection's other streams go on (h2 made them connection errors;
    Go resets the stream as well)."""
    h2c = H2Conversation(validate=False)
    upstream = h2c.add_upstream()
    bad_number = h2c.request(request_headers(b"/a", b"POST", content_length=b"abc"), b"x")
    two = h2c.request(
        request_headers(b"/b", b"POST") + [(b"content-length", b"1"), (b"content-length", b"2")],
        b"x",
    )
    events = h2c.exchange()
    assert reset_code(events, bad_number) == ErrorCodes.PROTOCOL_ERROR
    assert reset_code(events, two) == ErrorCodes.PROTOCOL_ERROR
    assert not of(events, h2.events.ConnectionTerminated) and not h2c.transport.closed
    assert upstream.take() == b""
    # trailers without END_STREAM, on a stream whose request went upstream
    sid = h2c.request(request_headers(b"/c", b"POST"), b"body", end=False)
    h2c.exchange()
    block = h2c.client.encoder.encode([(b"x-trailer", b"1")])
    events = h2c.exchange(HeadersFrame(sid, data=block, flags=["END_HEADERS"]).serialize())
    assert reset_code(events, sid) == ErrorCodes.PROTOCOL_ERROR
    assert not of(events, h2.events.ConnectionTerminated) and not h2c.transport.closed
    h2c.add_upstream()
    ok = h2c.request(request_headers(b"/after"))
    h2c.exchange()
    h2c.backend_sends(OK_2)
    assert body_of(h2c.events, ok) == b"ok"


async def test_an_undecodable_field_block_is_a_compression_error():
    """RFC 9113 §4.3: a field block that cannot be decompressed is a connection error of type
    COMPRESSION_ERROR (h2 calls it PROTOCOL_ERROR)."""
    h2c = H2Conversation()
    h2c.transport.take()
    # index 70 of an empty dynamic table (RFC 7541 §2.3.3: out of range)
    h2c.server.data_received(HeadersFrame(1, data=b"\xc6", flags=["END_HEADERS"]).serialize())
    assert h2c.transport.closed
    assert goaway_of(raw_frames(h2c.transport.take())) == (0, ErrorCodes.COMPRESSION_ERROR)


async def test_a_preface_or_header_block_never_completed_is_closed_after_the_read_timeout():
    """A connection that stops inside its preface (the magic but no SETTINGS, RFC 9113 §3.4)
    or inside a header block (no END_HEADERS) holds a connection and memory for nothing: the
    read timeout closes it, as the sniffer does for a partial magic (Go: its preface timeout);
    a quiet connection whose preface is whole waits for the idle timeout only."""
    conv = conversation()
    server = H2ServerConnection(conv.entry)
    transport = MemoryTransport(("127.0.0.7", 3))
    server.connection_made(transport)  # type: ignore[arg-type]
    server.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    now = time.perf_counter()
    server.check_timeouts(now + 5, 180, 60)
    assert not transport.closed
    server.check_timeouts(now + 61, 180, 60)
    assert transport.closed

    h2c = H2Conversation()
    h2c.server.check_timeouts(time.perf_counter() + 61, 180, 60)
    assert not h2c.transport.closed  # preface whole, no stream: the idle timeout's
    h2c.server.data_received(HeadersFrame(1, data=b"\x82").serialize())  # no END_HEADERS
    started = h2c.server.header_block.started
    assert started
    h2c.server.check_timeouts(started + 30, 180, 60)
    assert not h2c.transport.closed
    h2c.server.check_timeouts(started + 61, 180, 60)
    assert h2c.transport.closed


async def test_a_smaller_decoder_table_binds_only_once_the_client_acknowledged_it():
    """RFC 9113 §6.5.3 and RFC 7541 §4.2: `maxDecoderHeaderTableSize` below the default 4096
    takes effect when the client acknowledges our SETTINGS; blocks it sent before (curl and
    h2load send a request right after their preface) may index into a 4096-byte table. After
    the ACK a larger table-size update is a COMPRESSION_ERROR (§4.3). Traefik (Go) serves
    curl with the same option; the fresh tester saw GOAWAY on every first request here."""
    settings = EntryPointSettings(name="web", port=5000, h2_max_decoder_table_size=0)
    conv = conversation(None, settings)
    server = H2ServerConnection(conv.entry)
    transport = MemoryTransport(("127.0.0.7", 4))
    client = _Client(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    fields = request_headers(b"/same", user_agent=b"curl/8", accept=b"*/*")
    client.send_headers(1, fields, end_stream=True)
    client.send_headers(3, fields, end_stream=True)  # indexed references to block 1's entries
    upstreams = [conv.add_upstream()[1] for _ in range(3)]
    server.connection_made(transport)  # type: ignore[arg-type]
    server.data_received(client.data_to_send())
    events = client.receive_data(transport.take())
    assert not of(events, h2.events.ConnectionTerminated)
    sent = [u.take().startswith(b"GET /same HTTP/1.1\r\n") for u in upstreams]
    assert sorted(sent) == [False, True, True]  # both requests forwarded
    server.data_received(client.data_to_send())  # the ACK: now the table is 0 bytes
    client.send_headers(5, fields, end_stream=True)  # begins with a size update to 0
    server.data_received(client.data_to_send())
    assert upstreams[sent.index(False)].take().startswith(b"GET /same HTTP/1.1\r\n")
    assert not transport.closed
    # a dynamic table size update to 4096 (RFC 7541 §6.3) is over the acknowledged 0
    server.data_received(
        HeadersFrame(7, data=b"\x3f\xe1\x1f\x82", flags=["END_HEADERS"]).serialize()
    )
    assert transport.closed
    assert goaway_of(raw_frames(transport.take()))[1] == ErrorCodes.COMPRESSION_ERROR


async def test_request_line_and_field_bytes_an_http11_hop_cannot_carry_are_refused_or_encoded():
    """A translating intermediary must not hand an HTTP/1.1 backend an ambiguous request line
    or head (fresh tester F2): a :method that is not a token (RFC 9110 §9.1), a field name
    that is not a token (§5.1), a value with a CTL other than HTAB or DEL (§5.5), a :path
    with a CTL, HTAB or DEL get RST_STREAM(PROTOCOL_ERROR) (as Go/Traefik), nothing
    forwarded; SP and non-ASCII bytes in :path are percent-encoded (RFC 3986 §2.1), as Go's
    server does behind Traefik."""
    refused = [
        request_headers(b"/p", method=b"G T"),
        request_headers(b"/p", method=b"GET\t"),
        request_headers(b"/x\tHTTP/1.0"),
        request_headers(b"/a\x7fb"),
        request_headers(b"/a\x01b"),
        *(request_headers() + [(name, b"1")] for name in (b"x(y", b'x"y', b"x,y", b"x/y", b"x=y")),
        *(request_headers() + [(name, b"1")] for name in (b"x{y", b"x@y")),
        request_headers(x_v=b"a\x01b"),
        request_headers(x_v=b"a\x7fb"),
    ]
    for headers in refused:
        h2c = H2Conversation(validate=False)
        upstream = h2c.add_upstream()
        sid = h2c.request(headers)
        events = h2c.exchange()
        assert reset_code(events, sid) == ErrorCodes.PROTOCOL_ERROR, headers
        assert upstream.take() == b"", headers
        assert not h2c.transport.closed
    for path, sent in (
        (b"/admin /public", b"/admin%20/public"),
        ("/café".encode(), b"/caf%C3%A9"),
    ):
        h2c = H2Conversation(validate=False)
        upstream = h2c.add_upstream()
        h2c.request(request_headers(path, x_v=b"a\tb"))
        h2c.exchange()
        line, fields = head_of(upstream.take())
        assert line == b"GET " + sent + b" HTTP/1.1" and fields[b"x-v"] == b"a\tb"


async def test_a_host_field_differing_from_authority_is_dropped_and_authority_routes():
    """RFC 9113 §8.3.1 (a SHOULD): `host` differing from `:authority` may be treated as
    malformed; nghttp2's tools (`h2load -H 'Host: x'`) send both, and Traefik (Go) routes by
    :authority and ignores host. So does the proxy: the host field is dropped (fresh tester
    F13), the backend sees Host from :authority."""
    h2c = H2Conversation(validate=False)
    upstream = h2c.add_upstream()
    sid = h2c.request(request_headers(b"/h", host=b"other.test"))
    h2c.exchange()
    raw = upstream.take()
    line, fields = head_of(raw)
    assert line == b"GET /h HTTP/1.1" and fields[b"host"] == b"a.test"
    assert raw.lower().count(b"\r\nhost:") == 1
    h2c.backend_sends(OK_2)
    assert body_of(h2c.events, sid) == b"ok"
