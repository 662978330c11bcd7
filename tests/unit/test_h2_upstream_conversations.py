"""The h2c upstream pool (meshproxy.http2.upstream) as scripted conversations: frames in, frames
out, over in-memory transports.

The real proxy pieces run (HTTP/1.1 server connection, dispatch, router, middlewares, load
balancer, `H2Pool`), with the pool's connections on memory transports (tests/conversation.py)
and, on the other side of each, an `h2` server-side connection playing the backend: a test
reads the frames the proxy sent as h2 events, answers with h2 calls or raw frames (what h2
itself would refuse to send: GOAWAY followed by more frames, broken frames), and reads what
reached the HTTP/1.1 client, parsed by h11 (an independent implementation).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from meshproxy.http.errors import UpstreamConnectError
from meshproxy.http.upstream import TransportSettings
from meshproxy.http2.upstream import (
    MAX_TRIES,
    REPLAY_BACKOFF,
    STREAM_WINDOW,
    H2Pool,
    H2UpstreamConnection,
)
from tests.conversation import Conversation, MemoryTransport, conversation
from tests.helpers import wait_for

BACKEND = "h2c://127.0.0.1:9"


def config(retry: int = 0, url: str = BACKEND) -> dict[str, Any]:
    """Every request on `web` to one h2c server, through a retry middleware if `retry`."""
    router: dict[str, Any] = {"entryPoints": ["web"], "service": "s", "rule": "PathPrefix(`/`)"}
    dynamic: dict[str, Any] = {
        "http": {
            "routers": {"r": router},
            "services": {"s": {"loadBalancer": {"servers": [{"url": url}]}}},
        }
    }
    if retry:
        router["middlewares"] = ["retry"]
        dynamic["http"]["middlewares"] = {"retry": {"retry": {"attempts": retry}}}
    return dynamic


class CountingTransport(MemoryTransport):
    """A memory transport that counts writes (each is a send() syscall on a real socket)."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Backend:
    """An h2 server connection on the far side of one upstream connection's memory transport."""

    def __init__(
        self, conn: H2UpstreamConnection, transport: MemoryTransport, settings: dict[int, int]
    ) -> None:
        self.conn = conn
        self.transport = transport
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if settings:
            self.h2.local_settings = Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        self.events: list[Any] = []
        self.raw = b""  # every byte the proxy sent on this connection

    def pump(self) -> list[Any]:
        """Frames both ways until quiet; returns the new events the backend saw."""
        new: list[Any] = []
        for _ in range(20):
            self.conn.flush_now()  # what the loop would write at the end of this iteration
            data = self.transport.take()
            self.raw += data
            if data:
                new.extend(self.h2.receive_data(data))
            out = self.h2.data_to_send()
            if out and not self.transport.closed:
                self.conn.data_received(out)
            if not data and not out:
                break
        self.events.extend(new)
        return new

    def feed(self, frame: bytes) -> None:
        """Raw bytes to the proxy, outside h2's state machine (GOAWAY, broken frames)."""
        self.conn.data_received(frame)

    def requests(self) -> dict[int, list[tuple[bytes, bytes]]]:
        return {e.stream_id: e.headers for e in self.events if type(e) is RequestReceived}

    def body(self, stream_id: int) -> bytes:
        return b"".join(
            e.data for e in self.events if type(e) is DataReceived and e.stream_id == stream_id
        )

    def respond(
        self,
        stream_id: int,
        status: int = 200,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> None:
        self.h2.send_headers(
            stream_id, [(b":status", str(status).encode()), *(headers or [])], end_stream=False
        )
        for offset in range(0, len(body), 16384):  # the default SETTINGS_MAX_FRAME_SIZE
            self.h2.send_data(stream_id, body[offset : offset + 16384])
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        elif end:
            self.h2.end_stream(stream_id)
        self.pump()


class Rig:
    """The proxy for one or more HTTP/1.1 clients, its h2c pool dialling memory backends."""

    def __init__(
        self,
        dynamic: dict[str, Any] | None = None,
        backend_settings: dict[int, int] | None = None,
        transport: TransportSettings | None = None,
    ) -> None:
        self.conv: Conversation = conversation(dynamic or config(), transport=transport)
        pool = self.conv.pool
        assert isinstance(pool, H2Pool)
        self.pool = pool
        self.backend_settings = backend_settings or {}
        self.backends: list[Backend] = []
        self.dial_error: Exception | None = None
        self.dials = 0
        self.settings_first = False  # the server's SETTINGS arrive before the dial returns
        pool.dialer = self.dial
        self.clients = [(self.conv.client, self.conv.client_transport)]

    async def dial(self, pool: H2Pool) -> H2UpstreamConnection:
        self.dials += 1
        await asyncio.sleep(0)  # a dial takes at least a loop turn
        if self.dial_error is not None:
            raise self.dial_error
        conn = H2UpstreamConnection(pool)
        transport = CountingTransport(("127.0.0.1", 9))
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        backend = Backend(conn, transport, self.backend_settings)
        self.backends.append(backend)
        if self.settings_first:
            backend.pump()
        return conn

    def client(self, index: int = 0) -> tuple[Any, MemoryTransport]:
        while index >= len(self.clients):
            protocol = self.conv.entry.protocol_factory()
            transport = MemoryTransport(("127.0.0.7", 40000 + len(self.clients)))
            transport.protocol = protocol
            protocol.connection_made(transport)
            self.clients.append((protocol, transport))
        return self.clients[index]

    def send(self, data: bytes, client: int = 0) -> None:
        self.client(client)[0].data_received(data)

    def received(self, client: int = 0) -> bytes:
        return self.client(client)[1].take()

    async def settle(self) -> None:
        """Let dials and deferred starts run, then exchange frames with every backend."""
        for _ in range(5):
            await asyncio.sleep(0)
            for backend in self.backends:
                backend.pump()


def parse(data: bytes, method: str = "GET") -> list[Any]:
    """The client's view of `data` (h11 events), for a request with `method`."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    events = []
    while True:
        event = conn.next_event()
        if event in (h11.NEED_DATA, h11.PAUSED):
            break
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


def response_of(data: bytes, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes, Any]:
    events = parse(data, method)
    head = next(e for e in events if isinstance(e, h11.Response))
    body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
    end = next((e for e in events if isinstance(e, h11.EndOfMessage)), None)
    return head.status_code, dict(head.headers), body, end


GET = b"GET /path?q=1 HTTP/1.1\r\nHost: svc.ns.traefik.mesh\r\n\r\n"


# -- request and response translation (issue 11, acceptance 3) --------------------------------


async def test_request_becomes_one_stream_with_pseudo_fields_and_no_hop_by_hop_fields():
    """RFC 9113 §8.3.1 and §8.2.2: the request goes out as HEADERS with :method, :scheme,
    :authority (the client's Host, passHostHeader being true) and :path, without Host,
    hop-by-hop fields or fields the client's Connection named; X-Forwarded-For gets the client
    appended (as the HTTP/1.1 pool does) and `te: trailers` is passed on (RFC 9110 §10.1.4)."""
    rig = Rig()
    rig.send(
        b"GET /path?q=1 HTTP/1.1\r\nHost: svc.ns.traefik.mesh\r\nConnection: keep-alive, x-hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade-Insecure-Requests: 1\r\n"
        b"Accept: */*\r\n\r\n"
    )
    await rig.settle()
    (backend,) = rig.backends
    (headers,) = backend.requests().values()
    assert headers[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"svc.ns.traefik.mesh"),
        (b":path", b"/path?q=1"),
    ]
    names = [name for name, _ in headers]
    for gone in (b"host", b"connection", b"keep-alive", b"x-hop"):
        assert gone not in names
    fields = dict(headers[4:])
    assert fields[b"te"] == b"trailers"
    assert fields[b"accept"] == b"*/*" and fields[b"upgrade-insecure-requests"] == b"1"
    assert fields[b"x-forwarded-for"] == b"127.0.0.7"
    backend.respond(1, 200, b"hello", [(b"content-length", b"5"), (b"x-b", b"1")])
    status, head, body, end = response_of(rig.received())
    assert (status, body, end is not None) == (200, b"hello", True)
    assert head[b"content-length"] == b"5" and head[b"x-b"] == b"1" and b"date" in head
    assert rig.pool.busy == set() and len(rig.pool.connections) == 1


async def test_authority_is_the_servers_when_pass_host_header_is_false():
    """Traefik's passHostHeader false: the request carries the server's host:port, which
    HTTP/2 says in :authority (RFC 9113 §8.3.1)."""
    dynamic = config()
    dynamic["http"]["services"]["s"]["loadBalancer"]["passHostHeader"] = False
    rig = Rig(dynamic)
    rig.send(GET)
    await rig.settle()
    (headers,) = rig.backends[0].requests().values()
    assert (b":authority", b"127.0.0.1:9") in headers


async def test_chunked_request_body_and_trailers_go_as_data_and_a_trailing_headers_frame():
    """RFC 9113 §8.1: a chunked HTTP/1.1 body becomes DATA frames and its trailer section a
    HEADERS frame that ends the stream; response trailers reach a client that sent
    `TE: trailers` as the chunked body's trailer section (RFC 9112 §7.1.2)."""
    rig = Rig()
    rig.send(
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n"
    )
    await rig.settle()
    (backend,) = rig.backends
    assert backend.body(1) == b"hello world"
    trailers = [e for e in backend.events if type(e) is TrailersReceived]
    assert [t.headers for t in trailers] == [[(b"x-checksum", b"42")]]
    assert any(type(e) is StreamEnded for e in backend.events)
    backend.respond(1, 200, b"ok", trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"")])
    data = rig.received()
    assert b"transfer-encoding: chunked" in data.lower()
    events = parse(data, "POST")
    end = next(e for e in events if isinstance(e, h11.EndOfMessage))
    assert dict(end.headers)[b"grpc-status"] == b"0"


async def test_interim_responses_are_relayed_and_head_and_204_have_no_body():
    """RFC 9110 §15.2: a 103 reaches the client before the final response; a HEAD response
    and a 204 carry no body (RFC 9110 §9.3.2, §15.3.5), whatever Content-Length says."""
    rig = Rig()
    rig.send(b"HEAD /h HTTP/1.1\r\nHost: a.test\r\n\r\n")
    await rig.settle()
    backend = rig.backends[0]
    backend.h2.send_headers(1, [(b":status", b"103"), (b"link", b"</s.css>; rel=preload")])
    backend.pump()
    assert rig.received(0).startswith(b"HTTP/1.1 103 ")
    backend.h2.send_headers(1, [(b":status", b"200"), (b"content-length", b"10")], end_stream=True)
    backend.pump()
    status, head, body, end = response_of(rig.received(0), "HEAD")
    assert status == 200 and head[b"content-length"] == b"10" and body == b"" and end
    rig.send(b"DELETE /d HTTP/1.1\r\nHost: a.test\r\n\r\n")
    await rig.settle()
    backend.respond(3, 204)
    status, _, body, end = response_of(rig.received(0), "DELETE")
    assert (status, body) == (204, b"") and end


# -- multiplexing, MAX_CONCURRENT_STREAMS, dials (acceptance 2) --------------------------------


async def test_concurrent_requests_share_one_connection_and_one_dial():
    """Issue 11: requests multiplexed over few connections; sends that arrive while the
    first dial is in progress wait for it (one dial, not one per request)."""
    rig = Rig()
    for client in range(5):
        rig.send(GET, client)
    await rig.settle()
    assert rig.dials == 1
    (backend,) = rig.backends
    assert sorted(backend.requests()) == [1, 3, 5, 7, 9]
    for sid in (9, 1, 5, 3, 7):
        backend.respond(sid, 200, b"s%d" % sid)
    bodies = [response_of(rig.received(c))[2] for c in range(5)]
    assert sorted(bodies) == sorted(b"s%d" % s for s in (1, 3, 5, 7, 9))


async def test_streams_started_in_one_loop_iteration_leave_in_one_write():
    """Requests that arrive together (one read from a client, or several clients in one loop
    iteration) start their streams in one write to the server, not one syscall each."""
    rig = Rig()
    rig.send(GET, 0)
    await rig.settle()
    backend = rig.backends[0]
    backend.respond(1)
    transport = backend.transport
    assert isinstance(transport, CountingTransport)
    before = transport.writes
    for client in range(1, 5):
        rig.send(GET, client)
    await asyncio.sleep(0)
    assert transport.writes == before + 1
    assert sorted(backend.requests()) == [1]
    backend.pump()
    assert sorted(backend.requests()) == [1, 3, 5, 7, 9]


async def test_no_second_dial_when_the_settings_come_before_the_dial_returns():
    """A connection takes streams once the server's SETTINGS arrived (RFC 9113 §3.4), which
    may happen before the dialling task resumes: still one dial for all the waiting sends."""
    rig = Rig()
    rig.settings_first = True
    for client in range(3):
        rig.send(GET, client)
    await rig.settle()
    assert rig.dials == 1 and len(rig.pool.connections) == 1
    assert sorted(rig.backends[0].requests()) == [1, 3, 5]


async def test_max_concurrent_streams_one_opens_a_second_connection_then_queues():
    """RFC 9113 §5.1.2: the proxy never opens more streams than the server's
    SETTINGS_MAX_CONCURRENT_STREAMS; when every connection is full it dials another, up to the
    pool's bound, past which sends queue until a stream ends."""
    rig = Rig(backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    rig.pool.max_connections = 2
    rig.send(GET, 0)
    await rig.settle()
    rig.send(GET, 1)
    await rig.settle()
    assert rig.dials == 2
    assert [sorted(b.requests()) for b in rig.backends] == [[1], [1]]
    rig.send(GET, 2)
    await rig.settle()
    assert rig.dials == 2 and len(rig.pool.waiting) == 1
    rig.backends[1].respond(1, 200, b"second")
    assert response_of(rig.received(1))[2] == b"second"
    await rig.settle()
    assert sorted(rig.backends[1].requests()) == [1, 3]  # the queued one took the free slot
    rig.backends[1].respond(3, 200, b"third")
    rig.backends[0].respond(1, 200, b"first")
    assert response_of(rig.received(2))[2] == b"third"
    assert response_of(rig.received(0))[2] == b"first"


async def test_a_queued_send_times_out_with_503_and_a_failed_dial_gives_502():
    """A send that waits longer than dial_timeout for a stream is refused 503 (nothing reached
    the backend); a dial that fails answers 502 to every send that waited for it (Traefik's
    status for a connect error)."""
    rig = Rig(
        backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1},
        transport=TransportSettings(dial_timeout=2.0),
    )
    rig.pool.max_connections = 1
    rig.send(GET, 0)
    await rig.settle()
    rig.send(GET, 1)
    await rig.settle()
    loop = asyncio.get_running_loop()
    rig.pool.sweep(loop.time() + 3)
    assert response_of(rig.received(1))[0] == 503
    rig.backends[0].respond(1)
    assert response_of(rig.received(0))[0] == 200

    failing = Rig()
    failing.dial_error = UpstreamConnectError("dial 127.0.0.1:9: refused")
    failing.send(GET, 0)
    failing.send(GET, 1)
    await failing.settle()
    assert failing.dials == 1
    assert [response_of(failing.received(c))[0] for c in (0, 1)] == [502, 502]


# -- GOAWAY and REFUSED_STREAM (acceptance 2, 3: "a refused stream counts as nothing") ---------


async def test_goaway_drains_the_connection_and_streams_above_last_stream_id_go_again():
    """RFC 9113 §6.8: after GOAWAY(last_stream_id=1) stream 1 still completes on the old
    connection; stream 3 was not processed, so the pool sends it once more, as Go's transport
    does, on a new connection (no new stream goes on a draining one), with no retry
    middleware; the old connection closes once its last stream ends."""
    rig = Rig()
    rig.send(GET, 0)
    rig.send(GET, 1)
    await rig.settle()
    old = rig.backends[0]
    assert sorted(old.requests()) == [1, 3]
    old.feed(GoAwayFrame(0, last_stream_id=1, error_code=0).serialize())
    await rig.settle()
    assert rig.dials == 2
    new = rig.backends[1]
    assert sorted(new.requests()) == [1]
    new.respond(1, 200, b"retried")
    assert response_of(rig.received(1))[2] == b"retried"
    old.respond(1, 200, b"drained")  # h2 would refuse to send after its GOAWAY: raw h2 state
    assert response_of(rig.received(0))[2] == b"drained"
    assert old.transport.closed and rig.pool.connections == [new.conn]


async def test_refused_stream_is_tried_up_to_six_times_then_goes_to_retry_and_others_are_502():
    """RFC 9113 §8.7: REFUSED_STREAM means the request was not processed. The pool sends it
    again itself, as Go's transport does for Traefik (here on the same connection, still
    good), up to MAX_TRIES (6) streams in all; refused a sixth time, the try fails as "nothing
    reached the backend", which retry sends again (counted as a retry), and without retry it
    is a 502. Any other reset before the response is a 502, not retried; after the response
    started it cuts the client connection. (The waits between tries are zero here: the next
    test checks them.)"""
    assert MAX_TRIES == 6
    rig = Rig(config(retry=2))
    rig.pool.replay_backoff = (0.0,)
    rig.send(GET)
    await rig.settle()
    backend = rig.backends[0]
    refused = [1, 3, 5, 7, 9, 11]
    for sid in refused:
        backend.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        backend.pump()
        await rig.settle()
    assert sorted(backend.requests()) == [*refused, 13] and rig.dials == 1
    assert rig.received() == b""
    backend.respond(13, 200, b"seventh stream")
    assert response_of(rig.received())[2] == b"seventh stream"
    assert rig.conv.metrics.retries == {"s@file": 1}

    plain = Rig()
    plain.pool.replay_backoff = (0.0,)
    plain.send(GET)
    await plain.settle()
    for sid in refused:
        plain.backends[0].h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        plain.backends[0].pump()
        await plain.settle()
    assert response_of(plain.received())[0] == 502
    assert sorted(plain.backends[0].requests()) == refused

    rig.send(GET)
    await rig.settle()
    backend.h2.reset_stream(15, ErrorCodes.INTERNAL_ERROR)
    backend.pump()
    await rig.settle()
    assert response_of(rig.received())[0] == 502
    assert sorted(backend.requests()) == [*refused, 13, 15]  # not retried

    rig.send(GET, 1)
    await rig.settle()
    backend.respond(17, 200, b"part", end=False)
    assert rig.received(1).startswith(b"HTTP/1.1 200")
    backend.h2.reset_stream(17, ErrorCodes.INTERNAL_ERROR)
    backend.pump()
    assert rig.client(1)[1].aborted
    assert rig.pool.connections == [backend.conn]  # one stream failed, not the connection


async def test_refused_stream_waits_a_short_backoff_before_its_third_try():
    """Go's transport (x/net/http2 RoundTripOpt) sends an unprocessed request again at once,
    then after growing waits; here the second try goes at once, the third after
    REPLAY_BACKOFF[1] (with jitter), the fourth after REPLAY_BACKOFF[2]; a client that leaves
    during a wait
    ends the try and nothing more is sent."""
    rig = Rig()
    rig.send(GET)
    await rig.settle()
    backend = rig.backends[0]
    loop = asyncio.get_running_loop()

    def refuse(sid: int) -> float:
        backend.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        backend.pump()
        return loop.time()

    def sent(sid: int) -> bool:
        backend.pump()
        return sid in backend.requests()

    refuse(1)
    await rig.settle()
    assert sorted(backend.requests()) == [1, 3]  # the second try: at once
    refused_at = refuse(3)
    await rig.settle()
    assert sorted(backend.requests()) == [1, 3]  # waiting
    await wait_for(lambda: sent(5), 5, "third try")
    assert loop.time() - refused_at >= REPLAY_BACKOFF[1] / 2  # 50% to 150% of it (jitter)
    refuse(5)
    rig.client(0)[0].connection_lost(None)  # gone during the wait before the fourth try
    await asyncio.sleep(REPLAY_BACKOFF[2] * 2)  # past the wait: a try would have gone now
    await rig.settle()
    assert sorted(backend.requests()) == [1, 3, 5]
    assert rig.pool.busy == set() and not rig.pool.waiting


def same_client(rig: Rig, index: int, as_index: int) -> None:
    """Make client `index`'s requests count as client `as_index`'s, as an HTTP/2 client's
    streams share their connection; an HTTP/1.1 connection of the rig has one request at a
    time."""
    alias, real = rig.client(index)[0], rig.client(as_index)[0]
    default = rig.pool.client_of
    rig.pool.client_of = lambda ex: real if ex.sink is alias else default(ex)


async def test_waiting_sends_are_served_round_robin_across_clients():
    """F10 (fresh-h2): one client's backlog must not hold another client's request behind all
    of it. Every connection full (a bound of 1 connection, the server allows 1 stream): a
    "hog" client queues two sends, then a victim one; as streams free, the victim's goes
    second, not last (FIFO would serve hog, hog, victim)."""
    rig = Rig(backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    rig.pool.max_connections = 1
    same_client(rig, 3, 1)  # clients 1 and 3: the hog
    rig.send(GET, 0)
    await rig.settle()
    rig.send(GET, 1)
    rig.send(GET, 3)
    await rig.settle()
    rig.send(GET, 2)  # the victim
    await rig.settle()
    assert len(rig.pool.waiting) == 3
    backend = rig.backends[0]
    served = []
    for sid in (1, 3, 5, 7):
        backend.respond(sid)
        await rig.settle()
        served.extend(c for c in (0, 1, 2, 3) if rig.received(c))
    assert served == [0, 1, 2, 3]


async def test_one_client_cannot_fill_the_wait_queue():
    """F10: a client with `max_waiting_per_client` sends already waiting gets 503 for the
    next (nothing sent: retryable, as a full queue), while another client still queues."""
    rig = Rig(backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    rig.pool.max_connections = 1
    rig.pool.max_waiting_per_client = 1
    same_client(rig, 2, 1)
    rig.send(GET, 0)
    await rig.settle()
    rig.send(GET, 1)
    rig.send(GET, 2)  # the same client's second waiting send
    rig.send(GET, 3)
    await rig.settle()
    assert response_of(rig.received(2))[0] == 503
    assert len(rig.pool.waiting) == 2
    backend = rig.backends[0]
    for sid, client in ((1, 0), (3, 1), (5, 3)):
        backend.respond(sid)
        await rig.settle()
        assert response_of(rig.received(client))[0] == 200


async def test_a_refused_post_whose_body_left_is_not_sent_again_without_a_copy():
    """Neither the pool nor retry sends again what it cannot send whole (the HTTP/1.1 pool's
    rule): a POST whose body already went out on a refused stream gets 502, not a truncated
    second try."""
    rig = Rig(config(retry=2))
    rig.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nbody")
    await rig.settle()
    backend = rig.backends[0]
    assert backend.body(1) == b"body"
    backend.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    backend.pump()
    await rig.settle()
    assert response_of(rig.received(), "POST")[0] == 502
    assert sorted(backend.requests()) == [1]


# -- flow control (acceptance 1, 2) -----------------------------------------------------------


async def test_request_body_waits_for_window_updates_and_pauses_the_client():
    """RFC 9113 §5.2: the proxy sends no more than the server's window admits; the rest waits
    (bounded) while the client's body is paused, and goes when WINDOW_UPDATE opens it."""
    rig = Rig(backend_settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    client = rig.client(0)[1]
    rig.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 30\r\n\r\n")
    await rig.settle()
    rig.send(b"a" * 30)
    await rig.settle()
    backend = rig.backends[0]
    assert backend.body(1) == b"a" * 10 and not client.reading
    assert not any(type(e) is StreamEnded for e in backend.events)
    backend.h2.acknowledge_received_data(10, 1)  # h2 reopens only when half is used
    backend.h2.increment_flow_control_window(20, 1)
    backend.pump()
    await rig.settle()
    assert backend.body(1) == b"a" * 30 and client.reading
    assert any(type(e) is StreamEnded for e in backend.events)


async def test_a_paused_client_stops_acknowledging_its_stream_only():
    """Flow control end to end: while the client does not read, the proxy stops reopening
    that stream's window (the backend stops after STREAM_WINDOW bytes), yet keeps reopening
    the connection's, so other streams flow; reading again reopens the stream's window."""
    rig = Rig()
    rig.send(GET, 0)
    rig.send(GET, 1)
    await rig.settle()
    backend = rig.backends[0]
    backend.respond(1, 200, end=False)
    rig.client(0)[0].pause_writing()  # the slow client's socket buffer is full
    chunk = b"x" * 16384
    sent = 0
    while backend.h2.local_flow_control_window(1) >= len(chunk):
        backend.h2.send_data(1, chunk)
        sent += len(chunk)
        backend.pump()
    assert sent >= STREAM_WINDOW - len(chunk)
    updates = [e for e in backend.events if type(e) is WindowUpdated]
    assert not [u for u in updates if u.stream_id == 1]
    assert backend.h2.local_flow_control_window(1) < len(chunk)
    backend.respond(3, 200, b"y" * 100_000)  # the other stream is not held up
    assert response_of(rig.received(1))[2] == b"y" * 100_000
    rig.client(0)[0].resume_writing()
    backend.pump()
    assert backend.h2.local_flow_control_window(1) >= sent - len(chunk)


# -- a backend that breaks the protocol (bad input) --------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x00\x08\x06\x00\x00\x00\x00\x03" + b"12345678",  # PING on a stream
        b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00",  # WINDOW_UPDATE of 0
        b"\x00\x00\x02\x04\x00\x00\x00\x00\x00" + b"\x00\x00",  # SETTINGS, bad length
        b"\x00\x00\x02\x00\x00\x00\x00\x00\x00" + b"no",  # DATA on stream 0
        b"\x00\x00\x05\x00\x00\x00\x00\x00\x63" + b"ghost",  # DATA on an idle stream
    ],
    ids=["ping-on-stream", "zero-window-update", "settings-length", "data-on-0", "idle-stream"],
)
async def test_a_bad_frame_fails_only_that_connections_streams(bad):
    """Issue 11, bad input: a backend that sends a bad frame (RFC 9113 §5.4.1 connection
    error) fails the streams of its connection, 502 before their response started and an
    aborted client connection after, gets GOAWAY, and leaves the pool; a stream on another
    connection to the same server completes."""
    rig = Rig(backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    for client in range(3):
        rig.send(GET, client)
        await rig.settle()
    broken, healthy = rig.backends
    assert sorted(broken.requests()) == [1, 3] and sorted(healthy.requests()) == [1]
    broken.respond(3, 200, b"started", end=False)
    assert rig.received(1).startswith(b"HTTP/1.1 200")
    broken.feed(bad)
    assert response_of(rig.received(0))[0] == 502
    assert rig.client(1)[1].aborted
    assert broken.transport.closed
    written = broken.h2.receive_data(broken.transport.take())
    (goaway,) = [e for e in written if type(e) is ConnectionTerminated]
    assert goaway.error_code != ErrorCodes.NO_ERROR
    assert rig.pool.connections == [healthy.conn]
    healthy.respond(1, 200, b"fine")
    assert response_of(rig.received(2))[2] == b"fine"


async def test_a_server_that_does_not_speak_http2_is_a_502_at_once():
    """RFC 9113 §3.4: a server's connection preface is a SETTINGS frame. An `h2c` URL on a pod
    that answers in HTTP/1.1 fails its requests at once (502), not after waiting for a frame
    as long as the bytes "HTTP/1.1 " read as a frame header say (4.7 MB)."""
    rig = Rig()
    rig.send(GET)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    (backend,) = rig.backends
    backend.feed(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    assert response_of(rig.received())[0] == 502
    assert backend.transport.closed and rig.pool.connections == []


async def test_invalid_response_fields_are_a_502():
    """RFC 9113 §8.2.2: a response with a connection-specific field is malformed; the proxy
    does not forward it (502)."""
    rig = Rig()
    rig.send(GET)
    await rig.settle()
    backend = rig.backends[0]
    backend.h2.config.validate_outbound_headers = False
    backend.h2.config.normalize_outbound_headers = False
    backend.h2.send_headers(1, [(b":status", b"200"), (b"connection", b"close")], end_stream=True)
    backend.pump()
    assert response_of(rig.received())[0] == 502
    assert backend.transport.closed


# -- timeouts, deadlines, liveness, client gone -------------------------------------------------


async def test_response_header_timeout_resets_only_that_stream():
    """responseHeaderTimeout (Traefik's serversTransport), checked by the sweep from when the
    request was sent: 504 for that exchange, RST_STREAM(CANCEL) to the backend, the connection
    kept for the others."""
    rig = Rig(transport=TransportSettings(response_header_timeout=5.0))
    rig.send(GET)
    await rig.settle()
    backend = rig.backends[0]
    loop = asyncio.get_running_loop()
    rig.pool.sweep(loop.time() + 1)
    assert rig.received() == b""
    rig.pool.sweep(loop.time() + 6)
    assert response_of(rig.received())[0] == 504
    resets = [e for e in backend.pump() if type(e) is StreamReset]
    assert [(r.stream_id, r.error_code) for r in resets] == [(1, ErrorCodes.CANCEL)]
    assert rig.pool.connections == [backend.conn]


async def test_grpc_timeout_is_rewritten_to_the_time_left_and_enforced():
    """gRPC PROTOCOL-HTTP2.md "Timeout": the call's grpc-timeout becomes the exchange's deadline
    (dispatch); the backend is told the time left, not the original, and past the deadline the
    stream is cancelled and the client gets DEADLINE_EXCEEDED (504 mapped by the gRPC answer)."""
    rig = Rig()
    rig.send(
        b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/grpc\r\n"
        b"TE: trailers\r\ngrpc-timeout: 3S\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00"
    )
    await rig.settle()
    backend = rig.backends[0]
    (headers,) = backend.requests().values()
    timeout = dict(headers)[b"grpc-timeout"]
    assert timeout.endswith(b"u") or timeout.endswith(b"m")
    value = int(timeout[:-1]) / (1e6 if timeout.endswith(b"u") else 1e3)
    assert 2.0 < value <= 3.0
    loop = asyncio.get_running_loop()
    (stream,) = rig.pool.busy
    stream.ex.deadline -= 5  # the deadline has passed: what the clock would do in 3 s
    rig.pool.sweep(loop.time())
    data = rig.received()
    assert b"grpc-status: 4" in data
    resets = [e for e in backend.pump() if type(e) is StreamReset]
    assert [r.error_code for r in resets] == [ErrorCodes.CANCEL]


async def test_a_silent_connection_is_pinged_and_closed_without_an_answer():
    """Liveness (Traefik's readIdleTimeout/pingTimeout): a connection with a stream in flight
    silent for too long gets a PING; answered, it stays; unanswered within pingTimeout, it is
    closed and its stream fails (502)."""
    rig = Rig(transport=TransportSettings(read_idle_timeout=10.0, ping_timeout=5.0))
    rig.send(GET)
    await rig.settle()
    backend = rig.backends[0]
    loop = asyncio.get_running_loop()
    rig.pool.sweep(loop.time() + 11)
    pings = [e for e in backend.pump() if type(e) is PingReceived]
    assert len(pings) == 1  # h2 acked it: the connection lives on
    rig.pool.sweep(loop.time() + 15)
    assert rig.pool.connections == [backend.conn]
    rig.pool.sweep(loop.time() + 30)  # silent again: pinged ...
    backend.conn.flush_now()
    backend.transport.take()  # ... and the PING is lost
    rig.pool.sweep(loop.time() + 36)
    assert response_of(rig.received())[0] == 502
    assert backend.transport.closed and rig.pool.connections == []


async def test_idle_connections_close_after_idle_conn_timeout_with_goaway():
    """idleConnTimeout (Traefik's, 90 s by default): an HTTP/2 connection with no stream for
    that long is closed, with GOAWAY(NO_ERROR) first (RFC 9113 §6.8)."""
    rig = Rig(transport=TransportSettings(idle_conn_timeout=90.0))
    rig.send(GET)
    await rig.settle()
    backend = rig.backends[0]
    backend.respond(1)
    rig.received()
    loop = asyncio.get_running_loop()
    rig.pool.sweep(loop.time() + 30)
    assert not backend.transport.closed
    rig.pool.sweep(loop.time() + 91)
    events = (
        backend.pump()
        if not backend.transport.closed
        else backend.h2.receive_data(backend.transport.take())
    )
    assert [e.error_code for e in events if type(e) is ConnectionTerminated] == [
        ErrorCodes.NO_ERROR
    ]
    assert backend.transport.closed and rig.pool.connections == []


async def test_client_gone_cancels_only_its_stream():
    """RFC 9113 §8.7: a client that leaves gets its stream reset with CANCEL; the connection
    and its other streams carry on."""
    rig = Rig()
    rig.send(GET, 0)
    rig.send(GET, 1)
    await rig.settle()
    backend = rig.backends[0]
    rig.client(0)[0].connection_lost(None)
    resets = [e for e in backend.pump() if type(e) is StreamReset]
    assert [(r.stream_id, r.error_code) for r in resets] == [(1, ErrorCodes.CANCEL)]
    backend.respond(3, 200, b"still here")
    assert response_of(rig.received(1))[2] == b"still here"
    assert rig.pool.busy == set()


async def test_response_before_the_whole_request_cancels_the_rest_of_the_request():
    """RFC 9113 §8.1: a server may answer before the request is all sent; the exchange ends
    there and the proxy stops sending the request (RST_STREAM)."""
    rig = Rig()
    rig.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\nfirst")
    await rig.settle()
    backend = rig.backends[0]
    backend.respond(1, 413, b"too big")
    status, _, body, _ = response_of(rig.received(), "POST")
    assert (status, body) == (413, b"too big")
    resets = [e for e in backend.events if type(e) is StreamReset]
    assert [r.error_code for r in resets] == [ErrorCodes.CANCEL]


async def test_expect_100_continue_is_forwarded_and_answered_for_a_silent_backend():
    """RFC 9110 §10.1.1: `Expect: 100-continue` goes to the server (HTTP/2 keeps it, RFC 9113
    §8.2.2 names no such field connection-specific) and its 100 is relayed; a server that
    does not answer within expect_continue_timeout (Go's 1 s) gets the body anyway: the proxy
    sends the client 100 itself, as the HTTP/1.1 pool does."""
    rig = Rig()
    expect = b"PUT /e HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    rig.send(expect, 0)
    await rig.settle()
    backend = rig.backends[0]
    assert dict(backend.requests()[1])[b"expect"] == b"100-continue"
    backend.h2.send_headers(1, [(b":status", b"100")])
    backend.pump()
    assert rig.received(0) == b"HTTP/1.1 100 Continue\r\n\r\n"
    rig.send(expect, 1)
    await rig.settle()
    loop = asyncio.get_running_loop()
    rig.pool.sweep(loop.time())
    assert rig.received(1) == b""
    rig.pool.sweep(loop.time() + 1.5)
    assert rig.received(1) == b"HTTP/1.1 100 Continue\r\n\r\n"
    rig.send(b"body", 1)
    await rig.settle()
    assert backend.body(3) == b"body"


async def test_a_full_socket_buffer_to_the_backend_pauses_the_bodies_being_sent():
    """Bounded buffering: when the upstream socket's buffer is full (asyncio's pause_writing),
    the clients whose bodies go over that connection are paused until it drains."""
    rig = Rig()
    rig.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 8\r\n\r\nfour", 0)
    await rig.settle()
    backend = rig.backends[0]
    client = rig.client(0)[1]
    assert backend.body(1) == b"four" and client.reading
    backend.conn.pause_writing()
    assert not client.reading
    backend.conn.resume_writing()
    assert client.reading
    rig.send(b"more", 0)
    await rig.settle()
    assert backend.body(1) == b"fourmore"


async def test_a_refused_put_goes_again_whole_when_a_copy_is_kept():
    """When the request body is kept for replay (retry with `status`, idempotent methods), a
    refused stream whose body already left is rewound and sent again whole on a new stream."""
    dynamic = config(retry=2)
    dynamic["http"]["middlewares"]["retry"]["retry"]["status"] = ["503"]
    rig = Rig(dynamic)
    rig.send(b"PUT /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nbody")
    await rig.settle()
    backend = rig.backends[0]
    assert backend.body(1) == b"body"
    backend.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    backend.pump()
    await rig.settle()
    assert backend.body(3) == b"body"
    backend.respond(3, 200, b"ok")
    assert response_of(rig.received(), "PUT")[2] == b"ok"


async def test_a_malformed_status_fails_its_stream_only():
    """RFC 9113 §8.1.1: a response whose :status is not a three-digit code is malformed: a
    stream error (RST_STREAM PROTOCOL_ERROR), 502 for that exchange; the connection's other
    streams carry on."""
    rig = Rig()
    rig.send(GET, 0)
    rig.send(GET, 1)
    await rig.settle()
    backend = rig.backends[0]
    backend.h2.config.validate_outbound_headers = False
    backend.h2.send_headers(1, [(b":status", b"2000")])
    backend.pump()
    assert response_of(rig.received(0))[0] == 502
    resets = [e for e in backend.events if type(e) is StreamReset]
    assert [(r.stream_id, r.error_code) for r in resets] == [(1, ErrorCodes.PROTOCOL_ERROR)]
    backend.respond(3, 200, b"other")
    assert response_of(rig.received(1))[2] == b"other"


async def test_a_window_update_then_a_reset_in_one_read_ends_the_stream_cleanly():
    """h2 handles a whole read before its events are looked at: a WINDOW_UPDATE that lets the
    held body go, followed in the same read by the RST_STREAM that closed the stream, must
    end that exchange (502) and nothing else, not break the connection."""
    rig = Rig(backend_settings={SettingCodes.INITIAL_WINDOW_SIZE: 4})
    rig.send(GET, 1)
    await rig.settle()
    rig.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 12\r\n\r\n", 0)
    await rig.settle()
    rig.send(b"twelve bytes", 0)
    await rig.settle()
    backend = rig.backends[0]
    assert backend.body(3) == b"twel"
    backend.h2.increment_flow_control_window(8, 3)
    backend.h2.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
    backend.feed(backend.h2.data_to_send())
    assert response_of(rig.received(0), "POST")[0] == 502
    backend.pump()
    backend.respond(1, 200, b"fine")
    assert response_of(rig.received(1))[2] == b"fine"
    assert rig.pool.connections == [backend.conn]


async def test_a_pool_dropped_by_a_reload_finishes_its_streams_then_closes():
    """Hot reload: a pool the new config no longer uses is closed, but its streams in flight,
    and a send still waiting for a dial, finish on it; its connections close after their last
    stream (a retired pool is swept only while it is busy, so none may stay open)."""
    rig = Rig()
    rig.send(GET, 0)
    await rig.settle()
    first = rig.backends[0]
    rig.pool.max_connections = 2
    first.conn.max_streams = 1  # full: the next send needs a dial
    rig.send(GET, 1)
    rig.pool.close()
    await rig.settle()
    second = rig.backends[1]
    assert sorted(second.requests()) == [1]
    first.respond(1, 200, b"one")
    second.respond(1, 200, b"two")
    assert response_of(rig.received(0))[2] == b"one"
    assert response_of(rig.received(1))[2] == b"two"
    assert first.transport.closed and second.transport.closed
    assert rig.pool.busy == set() and rig.pool.connections == []


async def test_grpc_timeout_is_the_time_left_when_a_queued_call_starts():
    """gRPC PROTOCOL-HTTP2.md "Timeout": the backend is told the time left when the stream
    starts, so a call that waited for a free stream does not give the backend more time than
    its client has."""
    rig = Rig(backend_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    rig.pool.max_connections = 1
    rig.send(GET, 0)
    await rig.settle()
    rig.send(
        b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/grpc\r\n"
        b"TE: trailers\r\ngrpc-timeout: 3S\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00",
        1,
    )
    await rig.settle()
    (queued,) = rig.pool.waiting
    queued.ex.deadline -= 1.5  # what the clock does while it waits
    backend = rig.backends[0]
    backend.respond(1)
    await rig.settle()
    timeout = dict(backend.requests()[3])[b"grpc-timeout"]
    unit = {b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}[timeout[-1:]]
    assert 1.0 < int(timeout[:-1]) * unit <= 1.5
