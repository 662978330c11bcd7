"""The HTTP/1.1 upgrade handshake (RFC 9110 §7.8, RFC 6455 §4) as conversations over
in-memory transports: what reaches the backend, what reaches the client, and who owns each
transport afterwards (the byte pipe, or HTTP/1.1 again)."""

from __future__ import annotations

import asyncio

from wsproto.utilities import generate_accept_token

from meshproxy.l4.pipe import BytePipe
from tests.conversation import conversation, head_of

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: chat.demo.traefik.mesh\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + generate_accept_token(KEY) + b"\r\n\r\n"
)
CLIENT_FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # masked "Hello" (RFC 6455 §5.7)
SERVER_FRAME = b"\x81\x05Hello"


async def test_upgrade_is_forwarded_and_a_valid_101_becomes_a_pipe():
    """RFC 9110 §7.8: Connection/Upgrade are the hop-by-hop pair a proxy carries for an
    upgrade; client frames sent before the 101 are held, then both sides are piped."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(UPGRADE + CLIENT_FRAME)  # a client that does not wait for the 101
    line, fields = head_of(upstream.take())
    assert line == b"GET /chat HTTP/1.1"
    assert fields[b"connection"] == b"Upgrade" and fields[b"upgrade"] == b"websocket"
    assert fields[b"sec-websocket-key"] == KEY
    assert upstream.take() == b""  # the early frame waits for the 101
    answer = conv.backend_sends(SWITCH + SERVER_FRAME)
    await asyncio.sleep(0)
    answer += conv.client_transport.take()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"upgrade: websocket" in head.lower() and b"connection: upgrade" in head.lower()
    assert rest == SERVER_FRAME
    assert upstream.take() == CLIENT_FRAME  # held bytes replayed once the pipe started
    assert isinstance(conv.client_transport.protocol.pipe, BytePipe)
    assert conv.client_transport.protocol.pipe is upstream.protocol.pipe
    assert len(conv.entry.tunnels) == 1 and conv.entry.connections == set()
    assert conv.pool.idle == [] and conv.pool.busy == set()  # never back in the pool
    conv.client_transport.protocol.data_received(b"\x82\x80abcd")
    assert upstream.take() == b"\x82\x80abcd"
    assert conv.entrypoint_requests() == {101: 1}


async def test_wrong_accept_key_is_a_bad_gateway():
    """RFC 6455 §4.1: a 101 whose Sec-WebSocket-Accept does not answer the key fails the
    handshake: 502, and the backend connection is closed, not piped."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(UPGRADE)
    upstream.take()
    bad = SWITCH.replace(generate_accept_token(KEY), b"bm90IHRoZSBrZXk=")
    answer = conv.backend_sends(bad)
    assert answer.startswith(b"HTTP/1.1 502 ") and upstream.closed
    assert conv.entry.tunnels == set()


async def test_switch_to_another_protocol_than_asked_is_a_bad_gateway():
    """RFC 9110 §15.2.2: the server switches to one of the protocols the client listed."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(UPGRADE)
    answer = conv.backend_sends(SWITCH.replace(b"Upgrade: websocket", b"Upgrade: h2c"))
    assert answer.startswith(b"HTTP/1.1 502 ") and upstream.closed


async def test_backend_refusing_the_upgrade_keeps_the_connection_http():
    """RFC 9110 §7.8: a server may ignore Upgrade; its response is relayed as any other and
    the connection goes on as HTTP/1.1, with the next request served normally."""
    conv = conversation()
    conv.add_upstream()
    conv.send(UPGRADE)
    answer = conv.backend_sends(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert not conv.client_transport.done and conv.entry.tunnels == set()
    _, upstream2 = conv.upstreams[0]
    conv.add_upstream()
    conv.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"GET /next HTTP/1.1" in conv.upstream_received()
    assert conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").startswith(
        b"HTTP/1.1 200 OK"
    )


async def test_bytes_sent_early_to_a_refused_upgrade_are_read_as_http():
    """The held bytes were never the new protocol's: once the backend refused, they are
    parsed as HTTP/1.1, and a WebSocket frame there is a malformed request (400)."""
    conv = conversation()
    conv.add_upstream()
    conv.send(UPGRADE + CLIENT_FRAME)
    answer = conv.backend_sends(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    answer += conv.client_transport.take()
    assert answer.startswith(b"HTTP/1.1 404 ") and b"HTTP/1.1 400 " in answer


async def test_unknown_upgrade_tokens_are_forwarded_and_answered_once():
    """RFC 9110 §7.8: any protocol token may be asked for (h2c aside: see below); the client
    gets exactly one response, never the backend's and then the proxy's."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, X-Proto-Settings\r\n"
        b"Upgrade: foo/2\r\nX-Proto-Settings: abc\r\n\r\n"
    )
    _, fields = head_of(upstream.take())
    assert fields[b"upgrade"] == b"foo/2"
    assert b"x-proto-settings" not in fields  # named by Connection: hop-by-hop (RFC 9110 §7.6.1)
    answer = conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert answer.count(b"HTTP/1.1 ") == 1


async def test_upgrade_requests_with_a_body_or_connect_are_refused():
    """llhttp reads what follows an upgrade request's head as the new protocol, so an upgrade
    with a body cannot be framed: 501, nothing forwarded. CONNECT tunnels are not offered on an
    HTTP entrypoint (RFC 9110 §9.3.6): 501."""
    for raw in (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
    ):
        conv = conversation()
        _, upstream = conv.add_upstream()
        assert conv.send(raw).startswith(b"HTTP/1.1 501 ")
        assert upstream.take() == b""


async def test_invalid_upgrade_token_gets_400():
    """RFC 9110 §7.8: protocol = token ["/" token]."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: web socket\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 ") and upstream.take() == b""


# -- connection sniffing (meshproxy.l4.sniff) ---------------------------------------------------


def sniffed(*reads: bytes):
    """An accepted connection's first protocol fed `reads`; returns (transport, entry)."""
    from tests.conversation import MemoryTransport

    conv = conversation()
    conv.add_upstream()
    sniffer = conv.entry.connection_factory()
    transport = MemoryTransport(("127.0.0.8", 40001))
    transport.protocol = sniffer
    sniffer.connection_made(transport)
    for data in reads:
        transport.protocol.data_received(data)
    return transport, conv


async def test_plain_http_is_replayed_to_http1_whole_even_split():
    """The bytes read to decide are the HTTP/1.1 protocol's first bytes (hypercorn's wrapper,
    Traefik's router/tcp): a request split at any point is served."""
    from meshproxy.http.server import H1ServerConnection

    transport, conv = sniffed(b"G", b"ET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(transport.protocol, H1ServerConnection)
    assert conv.upstream_received().startswith(b"GET /x HTTP/1.1")
    assert conv.entry.sniffing == set()


async def test_http2_prior_knowledge_is_served_by_the_http2_server():
    """RFC 9113 §3.3: a client with prior knowledge sends the preface; the sniffer hands the
    connection, the preface included, to the HTTP/2 server, which answers with its SETTINGS
    (never an HTTP/1.1 400)."""
    import h2.config
    import h2.connection
    import h2.events

    from meshproxy.http2.server import H2ServerConnection

    transport, conv = sniffed(b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n")
    assert isinstance(transport.protocol, H2ServerConnection)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(bytes(transport.written))
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
    assert not transport.closed and b"HTTP/1.1" not in transport.written
    assert conv.entry.h2_connections == {transport.protocol}


async def test_without_an_http2_server_prior_knowledge_gets_goaway_http_1_1_required():
    """RFC 9113 §3.4 and §7: a sniffer given no HTTP/2 protocol sends the server preface and
    GOAWAY(HTTP_1_1_REQUIRED), then closes."""
    import h2.config
    import h2.connection
    import h2.events

    from meshproxy.l4.sniff import SniffingProtocol
    from tests.conversation import MemoryTransport

    conv = conversation()
    sniffer = SniffingProtocol(conv.entry.protocol_factory, conv.entry.sniffing)
    transport = MemoryTransport(("127.0.0.8", 40001))
    transport.protocol = sniffer
    sniffer.connection_made(transport)
    sniffer.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(bytes(transport.written))
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == 0xD  # HTTP_1_1_REQUIRED
    assert transport.closed and b"HTTP/1.1" not in transport.written


async def test_tls_client_hello_on_a_plain_entrypoint_is_closed_quietly():
    """RFC 8446 §5.1: a handshake record; TLS is not served on this entrypoint."""
    transport, conv = sniffed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.closed and transport.written == b""


async def test_a_connection_that_sends_nothing_is_closed_after_the_peek_timeout():
    """A peek has a timeout: a silent connection (or a partial HTTP/2 preface) goes after the
    entrypoint's read timeout, and nothing else is affected."""
    import time

    transport, conv = sniffed(b"PRI * HT")
    (sniffer,) = conv.entry.sniffing
    sniffer.check_timeout(time.perf_counter(), 60.0)
    assert not transport.closed
    sniffer.check_timeout(time.perf_counter() + 61, 60.0)
    assert transport.closed and conv.entry.sniffing == set()


# -- WebSocket framing and the proxy's own Close frames (meshproxy.l4.websocket) ----------------


def frames() -> list[bytes]:
    """Frames of every header form (RFC 6455 §5.2): 7-bit, 16-bit and 64-bit lengths, masked
    and not, control and data."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, Ping, TextMessage

    server, client = Connection(ConnectionType.SERVER), Connection(ConnectionType.CLIENT)
    return [
        server.send(TextMessage("hi")),
        client.send(TextMessage("masked")),
        server.send(BytesMessage(b"x" * 300)),
        client.send(BytesMessage(b"y" * 70000)),
        server.send(Ping(b"p")),
    ]


def test_frame_boundaries_are_found_however_the_stream_is_split():
    """RFC 6455 §5.2: a boundary is known after every frame, whatever the read sizes."""
    from meshproxy.l4.websocket import FrameBoundary

    stream = b"".join(frames())
    ends = set()
    at = 0
    for frame in frames():
        at += len(frame)
        ends.add(at)
    for size in (1, 2, 3, 7, 13, 1000, len(stream)):
        tracker = FrameBoundary()
        fed = 0
        for i in range(0, len(stream), size):
            piece = stream[i : i + size]
            tracker.feed(piece)
            fed += len(piece)
            assert tracker.at_boundary == (fed in ends), (size, fed)
        assert not tracker.close_seen


def test_close_frames_are_noticed():
    from meshproxy.l4.websocket import FrameBoundary, close_frame

    tracker = FrameBoundary()
    tracker.feed(close_frame(to_client=False))
    assert tracker.close_seen and tracker.at_boundary


async def test_going_away_sends_1001_to_both_sides_at_frame_boundaries():
    """RFC 6455 §7.4.1: on shutdown the proxy closes each WebSocket with 1001 (server role to
    the client, masked client role to the backend), then both connections close."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import CloseConnection

    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(UPGRADE)
    upstream.take()
    conv.backend_sends(SWITCH)
    await asyncio.sleep(0)
    conv.client_transport.take()
    conv.client_transport.protocol.data_received(CLIENT_FRAME)
    upstream.protocol.data_received(SERVER_FRAME)
    assert upstream.take() == CLIENT_FRAME and conv.client_transport.take() == SERVER_FRAME
    conv.entry.close_tunnels()
    as_client = Connection(ConnectionType.CLIENT)
    as_client.receive_data(conv.client_transport.take())
    (event,) = list(as_client.events())
    assert isinstance(event, CloseConnection) and event.code == 1001
    as_server = Connection(ConnectionType.SERVER)
    as_server.receive_data(upstream.take())
    (event,) = list(as_server.events())  # wsproto checks the frame is masked, as a server must
    assert isinstance(event, CloseConnection) and event.code == 1001
    assert conv.client_transport.closed and upstream.closed


async def test_going_away_mid_frame_closes_without_a_corrupting_close_frame():
    """A Close frame written inside a frame's payload would corrupt the stream: a side in the
    middle of a frame gets a plain close instead."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(UPGRADE)
    upstream.take()
    conv.backend_sends(SWITCH)
    await asyncio.sleep(0)
    conv.client_transport.take()
    upstream.protocol.data_received(b"\x82\x7e\x01\x00" + b"z" * 10)  # 256-byte frame, 10 sent
    conv.client_transport.take()
    conv.entry.close_tunnels()
    assert conv.client_transport.take() == b""  # no Close frame inside the payload
    assert upstream.take().startswith(b"\x88")  # the backend's direction was at a boundary
    assert conv.client_transport.closed and upstream.closed


async def test_connections_still_being_sniffed_count_as_open():
    """A connection that has not sent its first bytes yet (a slowloris) is open: the
    `traefik_open_connections` gauge counts it, once, whatever protocol it turns out to be."""
    transport, conv = sniffed()
    opened: list[int] = []
    conv.entry.on_open = opened.append
    sniffer = conv.entry.connection_factory()
    from tests.conversation import MemoryTransport

    t = MemoryTransport(("127.0.0.9", 40002))
    t.protocol = sniffer
    sniffer.connection_made(t)
    assert sum(opened) == 1  # counted while silent
    t.protocol.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # handed to HTTP/1.1
    assert sum(opened) == 1  # still once
    t.protocol.connection_lost(None)
    assert sum(opened) == 0
    silent = conv.entry.connection_factory()
    t2 = MemoryTransport(("127.0.0.9", 40003))
    silent.connection_made(t2)
    silent.connection_lost(None)  # left without a byte
    assert sum(opened) == 0


# -- upgrades the proxy ignores, and one answer per request (a second tester's findings) ---------


async def test_h2c_upgrade_is_made_by_the_proxy_so_every_stream_is_routed():
    """RFC 7540 §3.2: the proxy answers 101 itself and goes on as HTTP/2; the upgraded
    request is stream 1, and a later stream is routed like it. The upgrade is never forwarded
    (a backend switched to h2c would take streams the routers never saw: Traefik removes h2c
    upgrades for that reason)."""
    import h2.config
    import h2.connection
    import h2.events

    conv = conversation()
    _, upstream = conv.add_upstream()
    answer = conv.send(
        b"GET /pub HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    line, fields = head_of(upstream.take())
    assert line == b"GET /pub HTTP/1.1"
    assert b"upgrade" not in fields and b"connection" not in fields
    assert b"http2-settings" not in fields
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_upgrade_connection()
    protocol = conv.client_transport.protocol
    protocol.data_received(client.data_to_send())
    answered = conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await asyncio.sleep(0)  # streams answered in one loop iteration are written together
    answered += conv.client_transport.take()
    events = client.receive_data(answer.split(b"\r\n\r\n", 1)[1] + answered)
    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"ok"]
    _, upstream = conv.add_upstream()
    client.send_headers(
        3,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/n")],
        end_stream=True,
    )
    protocol.data_received(client.data_to_send())
    assert upstream.take().startswith(b"GET /n HTTP/1.1")


async def test_upgrade_in_http10_is_ignored_and_what_follows_is_parsed_as_http():
    """RFC 9110 §7.8: a server ignores Upgrade in an HTTP/1.0 request; the request pipelined
    after it is a request like any other, routed, never tunnelled."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(
        b"GET /101 HTTP/1.0\r\nHost: a\r\nConnection: Upgrade, keep-alive\r\nUpgrade: foo\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    first = upstream.take()
    assert b"upgrade" not in first.lower()
    assert conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").startswith(
        b"HTTP/1.1 200 OK"
    )


async def test_an_upgrade_refused_by_a_middleware_gets_one_answer():
    """One response per request: an upgrade answered 403 by ipAllowList is not followed by a
    501, and a request pipelined after it is served."""
    conv = conversation(
        {
            "http": {
                "routers": {
                    "r": {
                        "entryPoints": ["web"],
                        "service": "s",
                        "rule": "PathPrefix(`/`)",
                        "middlewares": ["deny"],
                    }
                },
                "middlewares": {"deny": {"ipAllowList": {"sourceRange": ["192.0.2.0/24"]}}},
                "services": {"s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:9"}]}}},
            }
        }
    )
    answer = conv.send(
        b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    await asyncio.sleep(0)
    answer += conv.client_transport.take()
    assert answer.count(b"HTTP/1.1 403 ") == 2 and b" 501 " not in answer


async def test_nothing_is_written_after_a_response_that_closes_the_connection():
    """One response per request: bytes after a `Connection: close` request are not answered
    with a 400; the connection just closes after the response."""
    conv = conversation()
    conv.add_upstream()
    answer = conv.send(
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    answer += conv.backend_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert answer.count(b"HTTP/1.1 ") == 1 and b"connection: close" in answer
    assert conv.client_transport.closed


async def test_forwarding_fields_are_never_forwarded_as_trailers():
    """RFC 9110 §6.5.1, and what Traefik does: a backend that merges trailers into headers must
    not see a client's X-Forwarded-For or X-Real-Ip."""
    conv = conversation()
    _, upstream = conv.add_upstream()
    conv.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    await asyncio.sleep(0)
    conv.send(b"5\r\nhello\r\n0\r\nX-Forwarded-For: 10.0.0.1\r\nX-Real-Ip: 10.0.0.1\r\n\r\n")
    assert upstream.take().endswith(b"5\r\nhello\r\n0\r\n\r\n")
