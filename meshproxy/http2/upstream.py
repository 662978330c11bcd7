"""HTTP/2 client side: the `h2c` upstream pool (Traefik Mesh's `mesh.traefik.io/scheme: h2c`).

`H2Pool` is the `ServerPool` (meshproxy.http.upstream) for servers with `h2c://` URLs: every
exchange sent to the server becomes one stream on a multiplexed HTTP/2 connection with prior
knowledge (RFC 9113 §3.3), spoken with the `h2` library (sans-IO) on an asyncio Protocol.

Connections. A send takes the oldest connection that is neither draining nor full (its streams
below the peer's SETTINGS_MAX_CONCURRENT_STREAMS, and never above
`MAX_STREAMS_PER_CONNECTION`), so requests share few connections. When all are full a new one
is dialled, as many as the streams in flight need, as Go's transport (only a runaway guard,
`MAX_CONNECTIONS`, bounds them), one dial at a time: sends that arrive while a dial is in
progress wait for it rather than dial again (no dial storm). A new connection
takes streams once the server's SETTINGS arrived (its connection preface, RFC 9113 §3.4), not
before: a server whose limit is below what a client assumes may treat the extra streams as a
connection error (h2's server does), and a pod that does not speak HTTP/2 fails the sends at
once instead of after their streams were written; within `dial_timeout`. Sends waiting for a
stream (at most `MAX_WAITING`) are served round-robin per client connection (`_WaitQueue`), so
one client's backlog of long-lived streams delays no one else's by more than a turn; a send
that finds the queue
full, or waits longer than `dial_timeout`, fails with `NoStreamAvailable` (503, nothing
reached the backend: retryable), as Envoy's pending-request overflow does. A failed dial fails
every waiting send with that dial's error (`UpstreamConnectError`, `UpstreamDialTimeout`).

GOAWAY (RFC 9113 §6.8) drains a connection: no new stream goes on it, streams up to its
last_stream_id run to their end, the others fail with `StreamRefused`, as does a stream reset
with REFUSED_STREAM (§8.7): both mean the backend processed nothing, so retry sends them
elsewhere. A refused request whose body can be sent whole again is first sent again on this
pool (a new stream, on another connection after GOAWAY), up to `MAX_TRIES` streams in all with
a short backoff (`REPLAY_BACKOFF`), as Go's transport does, so a graceful server restart or a
server draining under load costs no client a 502 even without a retry middleware. The
connection closes when its last stream ends.

Liveness: a connection silent for `read_idle_timeout` (Traefik's serversTransport
forwardingTimeouts.readIdleTimeout; when 0, as by default, only connections with streams in
flight, after `SILENT_STREAMS_PING` seconds) gets a PING; without the ack within
`ping_timeout` it is closed and its streams fail. Idle connections close after
`idle_conn_timeout`. All of it, and each stream's `response_header_timeout` and gRPC deadline
(`Exchange.deadline`), is checked by `sweep(now)` once a second: no timer per request.

Flow control, end to end (RFC 9113 §5.2). Request bodies: what the stream's and the
connection's send windows do not admit is held on the stream and the client's body paused
(`Sink.pause_request_body`) until WINDOW_UPDATE opens them; a full socket buffer pauses every
body being sent on that connection. Response bodies: the connection window is reopened as data
arrives (data already went to the client side), a stream's own only while its client keeps
up: `pause_reading` stops acknowledging that stream, so the backend stops after at most
`STREAM_WINDOW` bytes and no other stream of the connection is slowed.

A backend that breaks the protocol (a bad frame, invalid response fields, data beyond its
window) fails every stream of its connection, and only those: 502 before their response
started, an aborted response after; the connection is dropped (h2 answers GOAWAY with the error
code). A stream the backend resets fails alone.

h2 4.x moves the connection to CLOSED on any GOAWAY it receives and then refuses every frame,
so streams under last_stream_id could never finish (python-hyper/h2#1181, open): the
connection class here overrides h2's GOAWAY handler to record it without closing, the one
place this module reaches into h2's internals (tests/unit/test_h2_upstream_conversations.py
checks it on every h2 upgrade).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from random import random
from time import perf_counter
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from meshproxy.http.errors import (
    ClientGone,
    NoStreamAvailable,
    ResponseAborted,
    StreamRefused,
    UpstreamConnectError,
    UpstreamDialTimeout,
    UpstreamError,
    UpstreamResponseTimeout,
)
from meshproxy.http.exchange import Exchange
from meshproxy.http.fields import http_date
from meshproxy.http.forwarding import HOP_BY_HOP, NOT_TRAILERS
from meshproxy.http.grpc import format_grpc_timeout, is_grpc
from meshproxy.http.upstream import DoneCallback, ServerTarget, TransportSettings
from meshproxy.http2.hpack_memo import MemoDecoder, MemoEncoder
from meshproxy.upstream_address import resolve

log = logging.getLogger("meshproxy.upstream.h2")

# Connections per server. Go's transport (so Traefik, which has no serversTransport option for
# it) opens as many as the requests in flight need; long-lived streams (gRPC Watch, one client
# holding many) must not make every other client of the server wait, so the bound is only a
# guard against a runaway (a server advertising MAX_CONCURRENT_STREAMS=1 under a flood would
# otherwise take one file descriptor per request until the process has none left, for every
# server and listener): 1024 connections, >= 10k streams at any realistic server limit.
MAX_CONNECTIONS = 1024
# Sends waiting for a stream (while a dial is in progress, or past MAX_CONNECTIONS), served
# round-robin per client connection (_WaitQueue), so one client's burst does not delay another's.
MAX_WAITING = 4096
# ...of which one client connection may hold this many (above the 250 streams an HTTP/2 client
# connection gets by default, so one client's ordinary burst never meets it): no client fills
# the queue for the others.
MAX_WAITING_PER_CLIENT = 1024
# A refused stream (REFUSED_STREAM, or above a GOAWAY's last_stream_id: nothing processed) is
# sent again by the pool up to this many tries in all, as Go's transport retries unprocessed
# requests (up to 7 tries, backoff 1 s, 2 s, 4 s... + 10% jitter); here shorter waits before
# tries 3 to 6 (seconds, each drawn from 50% to 150% of the value: sends refused together, as
# by one GOAWAY, come back spread out rather than all onto the next connection again), so a
# server draining under load costs no client a 502 within about a second.
MAX_TRIES = 6
REPLAY_BACKOFF = (0.0, 0.05, 0.1, 0.2, 0.4)
# Streams per connection: the peer's MAX_CONCURRENT_STREAMS, never more than this (an unset
# setting means unlimited).
MAX_STREAMS_PER_CONNECTION = 1000
# Receive windows: per stream, the most a backend may send past a paused client (so the bound
# on what one slow client makes the proxy hold); per connection, shared by its streams.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# The largest response header list accepted (the HTTP/1.1 pool's head bound, 1 MiB).
MAX_HEADER_LIST_SIZE = 1 << 20
# With readIdleTimeout unset: a connection with streams in flight silent this long is pinged.
SILENT_STREAMS_PING = 30.0
_DEFAULT_PING_TIMEOUT = 15.0  # Traefik's pingTimeout
_PING_DATA = b"meshprxy"

_CONFIG = H2Configuration(
    client_side=True,
    header_encoding=None,  # names and values stay bytes, as across the exchange seam
    validate_outbound_headers=False,  # the request fields are built (and checked) here
    normalize_outbound_headers=False,
    validate_inbound_headers=True,  # a backend's malformed fields are a protocol error
)

_SKIP = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"http2-settings"}
_TE_TRAILERS = (b"te", b"trailers")
_NO_BODY_STATUS = (204, 304)

_DIALS: set[asyncio.Future[None]] = set()  # the loop keeps only weak references to tasks


class _WaitQueue:
    """Sends waiting for a stream, handed out round-robin across clients (their downstream
    connections), FIFO within each: a client queueing hundreds of streams delays another
    client's send by one turn, not by its whole backlog. Sends sent again after a refusal
    (`push_front`) go before all others, in the order they came back."""

    __slots__ = ("by_client", "first", "size")

    def __init__(self) -> None:
        # dict order is the round-robin order: a client served moves to the end
        self.by_client: dict[object, deque[H2Stream]] = {}
        self.first: deque[H2Stream] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[H2Stream]:
        yield from self.first
        for queue in self.by_client.values():
            yield from queue

    def waiting_for(self, stream: H2Stream) -> int:
        """How many sends of `stream`'s client wait (setting `stream.client`: see
        `client_of`)."""
        if stream.client is None:
            stream.client = stream.pool.client_of(stream.ex)
        queue = self.by_client.get(stream.client)
        return len(queue) if queue is not None else 0

    def append(self, stream: H2Stream) -> None:
        """Queue `stream` (after `waiting_for` set its client)."""
        queue = self.by_client.get(stream.client)
        if queue is None:
            queue = self.by_client[stream.client] = deque()
        queue.append(stream)
        self.size += 1

    def push_front(self, stream: H2Stream) -> None:
        self.first.append(stream)
        self.size += 1

    def put_back(self, stream: H2Stream) -> None:
        """`stream` was just taken and could not start: first in line again."""
        self.first.appendleft(stream)
        self.size += 1

    def popleft(self) -> H2Stream:
        """The next send (IndexError when empty)."""
        if self.first:
            self.size -= 1
            return self.first.popleft()
        by_client = self.by_client
        client = next(iter(by_client))
        queue = by_client.pop(client)
        stream = queue.popleft()
        if queue:
            by_client[client] = queue  # to the end of the round
        self.size -= 1
        return stream

    def remove(self, stream: H2Stream) -> None:
        """Take `stream` out if it is queued (it may be in a backoff, not queued)."""
        queue = self.by_client.get(stream.client)
        try:
            if queue is not None and stream in queue:
                queue.remove(stream)
                if not queue:
                    del self.by_client[stream.client]
            else:
                self.first.remove(stream)
        except ValueError:
            return
        self.size -= 1


def client_of(ex: Exchange) -> object:
    """Who sent `ex`, for the wait queue's fairness: the client's connection (an HTTP/2
    client's streams, whose sink is the stream, share their connection; an HTTP/1.1
    connection is its own sink). Not the client IP: in a mesh many pods, and every local
    client, may share one."""
    sink = ex.sink
    return getattr(sink, "conn", sink)


class _ClientH2(H2Connection):
    """h2's client connection with this pool's settings, and GOAWAY that drains (see the
    module docstring: python-hyper/h2#1181)."""

    # h2 remembers 2**16 closed stream ids (~120 bytes each, 7.5 MiB per long-lived backend
    # connection); 1024 is enough to ignore the late frames of streams reset lately.
    MAX_CLOSED_STREAMS = 1024

    def __init__(self) -> None:
        super().__init__(_CONFIG)
        # the same HPACK, remembering recurring field blocks (meshproxy/http2/hpack_memo.py)
        self.encoder = MemoEncoder()
        self.decoder = MemoDecoder(
            self.decoder.max_header_list_size, self.decoder.max_allowed_table_size
        )
        self.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        # h2's own moves to CLOSED and drops pending output; RFC 9113 §6.8 keeps the
        # connection open for the streams the peer still processes.
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code  # an unknown code (RFC 9113 §7) is kept as is
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def request_headers(ex: Exchange, target: ServerTarget) -> list[tuple[bytes, bytes]]:
    """The HEADERS of `ex` for `target` (RFC 9113 §8.3.1): pseudo-fields first (`:authority`
    from the request's Host when passHostHeader, else the server's), then the request's fields
    without hop-by-hop, Host and connection-nominated ones (§8.2.2), X-Forwarded-For with the
    client appended (as http.upstream.build_request_head), `te: trailers` when the client
    accepts trailers (gRPC needs it). `grpc-timeout` is set when the stream starts
    (`with_time_left`)."""
    request = ex.request
    path = target.path_prefix + request.target if target.path_prefix else request.target
    authority = (
        request.host_header
        if target.pass_host_header and request.host_header
        else target.host_header
    )
    headers = [
        (b":method", request.method.encode()),
        (b":scheme", b"http"),
        (b":authority", authority),
        (b":path", path),
    ]
    skip = _SKIP | request.connection_tokens if request.connection_tokens else _SKIP
    fields = request.headers
    headers.extend([(name, value) for name, value in fields if name not in skip])
    if request.append_client_ip:
        client = request.client_ip.encode()
        if request.forwarded_for:  # a trusted client sent X-Forwarded-For: append to it
            xff = b", ".join([value for name, value in fields if name == b"x-forwarded-for"])
            client = xff + b", " + client
        headers.append((b"x-forwarded-for", client))
    elif request.forwarded_for:
        headers.extend([(n, v) for n, v in fields if n == b"x-forwarded-for"])
    if request.te_trailers:
        headers.append(_TE_TRAILERS)
    return headers


def with_time_left(ex: Exchange, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with the call's `grpc-timeout` set to the time left before `ex.deadline`,
    when the stream starts (a send may have waited for it), as grpc-go's own client writes it
    (gRPC PROTOCOL-HTTP2.md, "Timeout"); added to a gRPC call whose deadline came another
    way. The backend's deadline is then never later than the client's."""
    timeout = format_grpc_timeout(ex.deadline - perf_counter())
    kept = [(n, v) for n, v in headers if n != b"grpc-timeout"]
    if len(kept) != len(headers) or is_grpc(ex.request):
        kept.append((b"grpc-timeout", timeout))
    return kept


class H2Stream:
    """One exchange's try on the server: queued for a stream, then one HTTP/2 stream. It is
    the exchange's `UpstreamHandle` (client gone, pause/resume reading) and, while the request
    body is sent, its `BodyTarget`."""

    __slots__ = (
        "backoff",
        "body_sent",
        "client",
        "client_paused",
        "conn",
        "continue_since",
        "done_callback",
        "ex",
        "finished",
        "headers",
        "pending",
        "pending_end",
        "pool",
        "queued_at",
        "reading_paused",
        "remote_ended",
        "request_ended",
        "response_started",
        "sent_at",
        "stream_id",
        "tries",
        "unacked",
    )

    def __init__(
        self,
        pool: H2Pool,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        done: DoneCallback,
    ) -> None:
        self.pool = pool
        self.ex = ex
        # Whose send this is, for the wait queue's round-robin; set when it first queues
        self.client: object = None
        self.headers = headers
        self.done_callback: DoneCallback | None = done
        self.conn: H2UpstreamConnection | None = None
        self.stream_id = 0
        self.queued_at = 0.0
        self.sent_at = 0.0  # loop time the request was all sent, while awaiting the head
        self.continue_since = 0.0  # loop time since which the client awaits 100 Continue
        self.pending: deque[bytes | memoryview] = deque()  # body beyond the send windows
        self.pending_end = False  # end_body came while body was pending
        self.body_sent = False  # a body byte was handed over (the body is no longer whole)
        self.client_paused = False  # this stream paused the client's request body
        self.reading_paused = False
        self.request_ended = False  # END_STREAM sent
        self.remote_ended = False  # END_STREAM received
        self.response_started = False
        self.finished = False
        self.tries = 1  # streams this send has been (1 + times refused and sent again)
        self.backoff: asyncio.TimerHandle | None = None  # the wait before the next try
        self.unacked = 0  # received bytes not yet handed back to the stream's window

    # -- request body (BodyTarget) --------------------------------------------------------

    def send_body(self, chunk: bytes) -> None:
        conn = self.conn
        if self.finished or not chunk or conn is None or self.request_ended:
            return
        self.body_sent = True
        if self.pending:
            self.pending.append(chunk)
        else:
            try:
                rest = self._write(chunk)
            except ProtocolError:  # h2 closed the stream: its reset or end is being handled
                self.request_ended = True
                return
            if rest is not None:
                self.pending.append(rest)
                conn.blocked.add(self)
        if self.pending or conn.write_paused:
            # Every time, not once: Exchange.attach_body_target resumes the client after
            # handing over what it had buffered, whatever this stream still holds.
            self.client_paused = True
            self.ex.sink.pause_request_body(self.ex)
        conn.flush()

    def end_body(self) -> None:
        conn = self.conn
        if self.finished or conn is None or self.request_ended:
            return
        if self.pending:
            self.pending_end = True
            return
        try:
            self._end_request()
        except ProtocolError:  # as in send_body
            self.request_ended = True
            return
        conn.flush()

    def _write(self, chunk: bytes | memoryview) -> memoryview | None:
        """Send what the send windows admit of `chunk`; return the rest, if any."""
        conn = self.conn
        assert conn is not None
        h2 = conn.h2
        sid = self.stream_id
        window = h2.local_flow_control_window(sid)
        size = len(chunk)
        frame = h2.max_outbound_frame_size
        if size <= window and size <= frame:
            h2.send_data(sid, chunk)  # the usual chunk: one frame, no slicing
            return None
        view = memoryview(chunk)
        offset = 0
        while offset < size and window > 0:
            n = min(window, frame, size - offset)
            h2.send_data(sid, view[offset : offset + n])
            offset += n
            window -= n
        return view[offset:] if offset < size else None

    def drain(self) -> None:
        """The send windows opened (WINDOW_UPDATE, SETTINGS): send what is pending, end the
        request if the client ended it meanwhile, and let the client go on."""
        conn = self.conn
        if self.finished or conn is None:
            return
        pending = self.pending
        h2 = conn.h2
        sid = self.stream_id
        try:
            while pending:
                if h2.local_flow_control_window(sid) <= 0:
                    return
                rest = self._write(pending.popleft())
                if rest is not None:
                    pending.appendleft(rest)
                    return
            if self.pending_end:
                self.pending_end = False
                self._end_request()
        except ProtocolError:
            # h2 handles a whole read before its events are seen here: a reset further on in
            # it closed the stream already. Nothing more is sent; that event ends the try.
            pending.clear()
            self.request_ended = True
        conn.blocked.discard(self)
        if self.client_paused and not conn.write_paused:
            self.client_paused = False
            self.ex.sink.resume_request_body(self.ex)

    def _end_request(self) -> None:
        conn = self.conn
        assert conn is not None
        trailers = self.ex.request_trailers
        kept = [(n, v) for n, v in trailers if n not in NOT_TRAILERS] if trailers else None
        if kept:
            conn.h2.send_headers(self.stream_id, kept, end_stream=True)
        else:
            conn.h2.end_stream(self.stream_id)
        self.request_ended = True
        if not self.response_started:
            self.sent_at = conn.loop.time()

    def pause_client(self) -> None:
        if not self.client_paused:
            self.client_paused = True
            self.ex.sink.pause_request_body(self.ex)

    # -- UpstreamHandle -------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client left: reset the stream (CANCEL, RFC 9113 §8.7); the try ends with
        ClientGone. The connection serves its other streams on."""
        if self.finished:
            return
        self._reset(ErrorCodes.CANCEL)
        self.finish(ClientGone())

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        conn = self.conn
        if self.unacked and conn is not None and not self.finished and not self.remote_ended:
            self._open_window(conn, self.unacked)
            self.unacked = 0
            conn.flush()

    def _open_window(self, conn: H2UpstreamConnection, size: int) -> None:
        try:
            conn.h2.increment_flow_control_window(size, self.stream_id)
        except (ProtocolError, KeyError):
            # h2 handles a whole read before its events are seen here: by now the stream may
            # have ended or been reset further on in the same read; its window no longer counts.
            pass

    # -- the response (from the connection) -----------------------------------------------

    def fail_malformed(self, reason: str) -> None:
        self._reset(ErrorCodes.PROTOCOL_ERROR)
        if self.response_started:
            self.finish(ResponseAborted(f"malformed response: {reason}"))
        else:
            self.finish(UpstreamError(f"malformed response: {reason}"))

    def on_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.finished:
            return
        ex = self.ex
        fields = []
        content_length = None
        has_date = False
        for name, value in headers:
            if name[:1] == b":":
                continue
            if name == b"content-length":
                try:
                    content_length = int(value)  # h2 checks it against the DATA received
                except ValueError:
                    content_length = None
            elif name == b"date":
                has_date = True
            fields.append((name, value))
        if not has_date:
            # as Go's server adds it, and so Traefik (RFC 9110 §6.6.1: the proxy has a clock)
            fields.append((b"date", http_date()))
        self.response_started = True
        self.sent_at = 0.0
        self.continue_since = 0.0
        no_body = ex.request.method == "HEAD" or status in _NO_BODY_STATUS
        ex.start_response(status, fields, content_length, no_body)
        if ex.swallowed_status and not self.finished:
            # This try's answer goes nowhere (retry on status): stop it now, not after its body.
            self._reset(ErrorCodes.CANCEL)
            self.finish(None)

    def on_interim(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.finished:
            return
        ex = self.ex
        self.continue_since = 0.0
        fields = [(n, v) for n, v in headers if n[:1] != b":"]
        ex.sink.write_interim(ex, status, fields)

    def on_data(self, data: bytes, flow_controlled: int, ended: bool) -> None:
        ex = self.ex
        if data:
            ex.send_body(data)
        if ended or self.finished:
            return
        unacked = self.unacked + flow_controlled
        if unacked >= STREAM_WINDOW // 2 and not self.reading_paused:
            conn = self.conn
            assert conn is not None
            self._open_window(conn, unacked)
            unacked = 0
        self.unacked = unacked

    def on_end(self) -> None:
        self.remote_ended = True
        if self.finished:
            return
        ex = self.ex
        if not self.response_started:  # h2 lets no stream end without a response head
            self.finish(UpstreamError("backend ended the stream without a response"))
            return
        ex.end_response()
        if not self.request_ended:
            # Answered before the whole request was sent (RFC 9113 §8.1): stop sending it.
            self._reset(ErrorCodes.CANCEL)
        self.finish(None)

    def on_reset(self, code: int) -> None:
        self.remote_ended = True
        if self.finished:
            return
        if code == ErrorCodes.REFUSED_STREAM and not self.response_started:
            self.finish(StreamRefused("backend refused the stream (REFUSED_STREAM)"))
        elif self.response_started:
            self.finish(ResponseAborted(f"backend reset the stream ({_code_name(code)})"))
        else:
            self.finish(UpstreamError(f"backend reset the stream ({_code_name(code)})"))

    # -- ending the try -------------------------------------------------------------------

    def check(self, now: float, clock: float) -> None:
        """Sweep: the response head's timeout (`now`, loop clock) from when the request was
        all sent, the exchange's deadline (`clock`, perf_counter), 100 Continue on the
        backend's behalf, and a client that left while queued."""
        ex = self.ex
        if self.finished:
            return
        if self.conn is None:  # still queued
            if ex.client_gone:
                self.finish(ClientGone())
            elif ex.deadline and clock >= ex.deadline:
                self.finish(UpstreamResponseTimeout("deadline passed waiting for a stream"))
            elif now - self.queued_at > self.pool.wait_limit:
                self.finish(NoStreamAvailable("no stream to the server in time"))
            return
        if ex.deadline and clock >= ex.deadline:
            self._reset(ErrorCodes.CANCEL)
            self.finish(UpstreamResponseTimeout("deadline passed"))
            return
        timeout = self.pool.settings.response_header_timeout
        sent_at = self.sent_at
        if sent_at and timeout > 0 and now - sent_at > timeout and not self.response_started:
            self._reset(ErrorCodes.CANCEL)
            self.finish(UpstreamResponseTimeout("no response headers in time"))
            return
        since = self.continue_since
        if since and now - since >= self.pool.settings.expect_continue_timeout:
            self.continue_since = 0.0  # as the HTTP/1.1 pool: 100 on the backend's behalf
            ex.sink.write_continue(ex)

    def _reset(self, code: ErrorCodes) -> None:
        conn = self.conn
        if conn is None or conn.closed or (self.remote_ended and self.request_ended):
            return
        try:
            conn.h2.reset_stream(self.stream_id, code)
        except ProtocolError:  # already closed on h2's side: nothing to reset
            return
        conn.flush()

    def finish(self, exc: BaseException | None) -> None:
        """End the try: `done` is called once, with None or the error; the stream leaves its
        connection and the pool. A refused stream leaves the body as retry needs it: whole
        (never touched, or rewound from the replay copy) or visibly touched."""
        if self.finished:
            return
        if type(exc) is StreamRefused and self.tries < MAX_TRIES and self._rewind():
            self._replay()
            return
        self.finished = True
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None
        ex = self.ex
        pool = self.pool
        pool.busy.discard(self)
        conn = self.conn
        self.pending.clear()
        if ex.upstream is self:
            ex.upstream = None
        if ex.body_target is self:
            if exc is None or not self.body_sent or type(exc) is not StreamRefused:
                ex.detach_body_target()
            else:
                # Refused after part of the body left: whole again from the kept copy if there
                # is one; without one rewind_body refuses and the try stays touched.
                ex.rewind_body()
        if self.client_paused:
            self.client_paused = False
            ex.sink.resume_request_body(ex)
        done = self.done_callback
        self.done_callback = None
        if conn is not None:
            conn.stream_closed(self)
        else:
            pool.unqueue(self)
        if done is not None:
            done(exc)

    def _rewind(self) -> bool:
        """Make the request whole again for another stream, if it can be: not answered, the
        client still there, and no body byte gone (or all of it kept for replay)."""
        ex = self.ex
        if self.response_started or ex.client_gone or self.conn is None:
            return False
        if ex.body_target is not self:
            return True
        if not self.body_sent:
            ex.detach_body_target()
            return True
        return ex.rewind_body()

    def _replay(self) -> None:
        """The stream was refused (nothing processed): send it again on this pool, as Go's
        transport does (so Traefik), and the HTTP/1.1 pool for a stale keep-alive connection:
        the second try at once, the next ones after `pool.replay_backoff` (a server shedding
        load or restarting gets a moment). The MAX_TRIES-th refusal ends the try with
        StreamRefused, for retry to take elsewhere. While it waits it is swept as queued
        (client gone, deadline, wait limit)."""
        conn = self.conn
        assert conn is not None
        backoff = self.pool.replay_backoff
        delay = backoff[min(self.tries - 1, len(backoff) - 1)] if backoff else 0.0
        delay *= 0.5 + random()  # jitter: see REPLAY_BACKOFF
        self.tries += 1
        self.pending.clear()
        self.pending_end = False
        if self.client_paused:  # the exchange holds the body now, with its own bound
            self.client_paused = False
            self.ex.sink.resume_request_body(self.ex)
        conn.stream_closed(self)
        self.conn = None
        self.stream_id = 0
        self.sent_at = 0.0
        self.continue_since = 0.0
        self.body_sent = False
        self.request_ended = False
        self.remote_ended = False
        self.unacked = 0
        if delay <= 0:
            self.pool.restart(self)
            return
        self.queued_at = conn.loop.time()
        self.backoff = conn.loop.call_later(delay, self._resend)

    def _resend(self) -> None:
        """The backoff before the next try is over."""
        self.backoff = None
        if not self.finished:
            self.pool.restart(self)


def _status(stream: H2Stream, headers: list[tuple[bytes, bytes]]) -> int:
    """The `:status` (h2 checked it is there, first); a malformed one fails the stream
    (RFC 9113 §8.1.1: a malformed response is a stream error) and reads as 0."""
    value = headers[0][1]
    if len(value) == 3 and value.isdigit():
        return int(value)
    stream.fail_malformed(f"invalid :status {value!r}")
    return 0


def _code_name(code: int | None) -> str:
    try:
        return ErrorCodes(code or 0).name
    except ValueError:
        return f"error code {code}"


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to the server, carrying many streams."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_event_loop()
        self.h2 = _ClientH2()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams with body held by the send windows
        self.max_streams = 0  # the peer's MAX_CONCURRENT_STREAMS, once its SETTINGS arrived
        self.ready = False  # the peer's SETTINGS arrived: streams may open
        self.closed = False
        self.draining = False  # GOAWAY received, or the pool is closing: no new streams
        self.write_paused = False
        self.last_read = self.loop.time()
        self.idle_since = self.last_read
        self.ping_sent_at = 0.0
        self.conn_unacked = 0  # received bytes not yet handed back to the connection window
        self.flush_pending = False  # a write of h2's output is scheduled (see flush)
        self.preface: bytes | None = b""  # the server's first bytes, until its SETTINGS is seen

    @property
    def has_room(self) -> bool:
        return (
            self.ready
            and not self.draining
            and not self.closed
            and len(self.streams) < self.max_streams
        )

    # -- lifecycle ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("backend closed the connection")

    def flush(self) -> None:
        """Write what h2 has queued at the end of this loop iteration: the streams started
        and the frames answered in one iteration (a burst of requests read from a client)
        leave in one write, one syscall."""
        if not self.flush_pending and not self.closed:
            self.flush_pending = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write what h2 has queued, now."""
        self.flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """Close now, politely (GOAWAY NO_ERROR) when no stream is open."""
        if self.closed:
            return
        if not self.streams:
            try:
                self.h2.close_connection()
            except ProtocolError:
                pass
        self.flush_now()  # before the transport closes
        self._fail_all("connection closed by the proxy")

    def _fail_all(
        self, reason: str, before_ready: type[UpstreamConnectError] | None = None
    ) -> None:
        """The connection is gone or unusable: its streams fail (502 before their response
        started, an abort after), the pool forgets it. Before the server's SETTINGS came it was
        the pool's dial: the sends waiting for it fail as for a failed dial (`before_ready`)."""
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if not self.ready:
            error = (before_ready or UpstreamConnectError)(
                f"h2c {self.pool.host}:{self.pool.port}: {reason}"
            )
            self.pool.dial_failed(error)
        for stream in list(self.streams.values()):
            if stream.response_started:
                stream.finish(ResponseAborted(reason))
            else:
                stream.finish(UpstreamError(reason))
        self.streams.clear()
        self.blocked.clear()
        if self.transport is not None:
            self.transport.close()
        self.pool.serve_waiting()

    # -- streams --------------------------------------------------------------------------

    def start(self, stream: H2Stream) -> bool:
        """Open `stream` here; False when the connection cannot take it after all."""
        h2 = self.h2
        ex = stream.ex
        sid = h2.get_next_available_stream_id()
        headers = with_time_left(ex, stream.headers) if ex.deadline else stream.headers
        try:
            h2.send_headers(sid, headers, end_stream=not ex.has_body)
        except TooManyStreamsError:
            self.max_streams = len(self.streams)  # h2 counts one more: wait for one to end
            return False
        except ProtocolError:  # h2 will open no stream here: take no more
            self.draining = True
            self.pool.forget_for_new_streams(self)
            return False
        stream.conn = self
        stream.stream_id = sid
        self.streams[sid] = stream
        now = self.loop.time()
        if not ex.has_body:
            stream.request_ended = True
            stream.sent_at = now
        else:
            if ex.request.expect_continue and not ex.body_complete:
                stream.continue_since = now
            ex.attach_body_target(stream)
            if self.write_paused and not stream.finished:
                stream.pause_client()
        self.flush()
        return True

    def stream_closed(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.blocked.discard(stream)
        if self.closed:
            return
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.draining:
                self.close()
                return
        self.pool.serve_waiting()

    # -- receiving ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if self.preface is not None and not self._check_preface(data):
            return
        try:
            events: list[Any] = self.h2.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued GOAWAY with the error code (RFC 9113 §5.4.1)
            self.flush_now()
            self._fail_all(f"backend broke the HTTP/2 protocol: {exc}")
            return
        streams = self.streams
        started: list[H2Stream] | None = None
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                size = event.flow_controlled_length
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, size, event.stream_ended is not None)
                if not self.closed:
                    self._ack_connection(size)
            elif kind is ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    headers = event.headers
                    stream.on_response(_status(stream, headers), headers)
                    if event.stream_ended is None:
                        if started is None:
                            started = []
                        started.append(stream)
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_end()
            elif kind is TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.finished:
                    trailers = [(n, v) for n, v in event.headers if n[:1] != b":"]
                    stream.ex.response_trailers = trailers
            elif kind is WindowUpdated:
                self._window_opened(event.stream_id)
            elif kind is StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif kind is InformationalResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.finished:
                    headers = event.headers
                    stream.on_interim(_status(stream, headers), headers)
            elif kind is RemoteSettingsChanged:
                self._settings_changed(event)
            elif kind is PingAckReceived:
                self.ping_sent_at = 0.0
            elif kind is ConnectionTerminated:
                self._goaway(event)
            if self.closed:
                return
        if started is not None:
            for stream in started:
                if not stream.finished:
                    stream.ex.sink.flush(stream.ex)  # a head without body bytes yet
        self.flush()

    def _check_preface(self, data: bytes) -> bool:
        """RFC 9113 §3.4: the server's first frame is SETTINGS. Checked here because h2 reads
        a frame's length before its type and waits for that many bytes: a pod that answers in
        HTTP/1.1 ("HTTP/1.1 " reads as a 4.7 MB frame) would hold its streams until a timeout."""
        head = (self.preface or b"") + data[:4]
        if len(head) < 4:
            self.preface = head
            return True
        self.preface = None
        if head[3] == 0x04:  # SETTINGS
            return True
        self._fail_all("backend did not start with HTTP/2 SETTINGS (not an h2c server?)")
        return False

    def _ack_connection(self, size: int) -> None:
        # The data went to the client side at once, so the connection window reopens as it
        # arrives; each stream's reopens as its client reads (H2Stream.on_data).
        unacked = self.conn_unacked + size
        if unacked >= CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(unacked)
            unacked = 0
        self.conn_unacked = unacked

    def _window_opened(self, stream_id: int) -> None:
        if not self.blocked:
            return
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream in self.blocked:
                stream.drain()
            return
        for stream in list(self.blocked):
            stream.drain()

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        peer_max = self.h2.remote_settings.max_concurrent_streams
        self.max_streams = min(peer_max, MAX_STREAMS_PER_CONNECTION)
        if not self.ready:
            self.ready = True
            self.pool.connection_ready(self)
            return
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._window_opened(0)
        self.pool.serve_waiting()

    def _goaway(self, event: ConnectionTerminated) -> None:
        """RFC 9113 §6.8: streams above last_stream_id were not processed: refused (retry
        sends them elsewhere); the others run on; the connection takes no new stream."""
        self.draining = True
        self.pool.forget_for_new_streams(self)
        last = event.last_stream_id or 0
        reason = f"backend sent GOAWAY ({_code_name(event.error_code)}) before this stream"
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream.remote_ended = True  # nothing to reset: the peer ignores it
                stream.request_ended = True
                stream.finish(StreamRefused(reason))
        if not self.streams:
            self.close()
        else:
            self.pool.serve_waiting()

    # -- writing --------------------------------------------------------------------------

    def pause_writing(self) -> None:
        # The socket buffer is full: every body being sent waits (bounded buffering).
        self.write_paused = True
        for stream in list(self.streams.values()):
            if not stream.request_ended and stream.ex.body_target is stream:
                stream.pause_client()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.client_paused and not stream.pending:
                stream.client_paused = False
                stream.ex.sink.resume_request_body(stream.ex)

    # -- liveness -------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """Sweep: PING a silent connection, close one whose PING went unanswered or that has
        been idle for idle_conn_timeout."""
        settings = self.pool.settings
        if not self.ready:
            limit = settings.dial_timeout
            if limit > 0 and now - self.idle_since > limit:  # idle_since: since it opened
                self._fail_all("no SETTINGS from the server in time", UpstreamDialTimeout)
            return
        if self.ping_sent_at:
            limit = settings.ping_timeout if settings.ping_timeout > 0 else _DEFAULT_PING_TIMEOUT
            if now - self.ping_sent_at > limit:
                log.info("h2c %s:%s: no PING ack in %.0fs", self.pool.host, self.pool.port, limit)
                self._fail_all("backend did not answer PING")
            return
        silent = settings.read_idle_timeout
        if silent <= 0 and self.streams:
            silent = SILENT_STREAMS_PING
        if silent > 0 and now - self.last_read > silent:
            self.ping_sent_at = now
            self.h2.ping(_PING_DATA)
            self.flush()
            return
        idle = settings.idle_conn_timeout
        if not self.streams and idle > 0 and now - self.idle_since > idle:
            self.close()


class H2Pool:
    """HTTP/2 connections to one `h2c://` server (see the module docstring)."""

    def __init__(self, scheme: str, host: str, port: int, settings: TransportSettings) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.settings = settings
        self.connections: list[H2UpstreamConnection] = []  # open, oldest first
        self.draining: set[H2UpstreamConnection] = set()  # open, taking no new stream
        self.busy: set[H2Stream] = set()  # queued or open streams: swept
        self.waiting = _WaitQueue()
        self.dialing = False
        self.closing = False
        self.wait_limit = settings.dial_timeout if settings.dial_timeout > 0 else 30.0
        self.max_connections = MAX_CONNECTIONS
        self.max_waiting_per_client = MAX_WAITING_PER_CLIENT
        self.client_of: Callable[[Exchange], object] = client_of
        # seconds before tries 2, 3... of a refused send (any length: the tests set their own)
        self.replay_backoff: tuple[float, ...] = REPLAY_BACKOFF
        # How connections are made (in-memory transports in the conversation tests).
        self.dialer: Callable[[H2Pool], Awaitable[H2UpstreamConnection]] = dial_tcp

    # -- ServerPool -----------------------------------------------------------------------

    def send(self, ex: Exchange, target: ServerTarget, done: DoneCallback) -> None:
        """Send `ex` as a stream on a connection with room, or queue it for one."""
        ex.server_url = target.url  # the access log's ServiceURL
        if ex.client_gone:
            done(ClientGone())
            return
        if ex.request.upgrade is not None:
            # HTTP/2 has no Upgrade (RFC 9113 §8.6); WebSocket over it is extended CONNECT
            # (RFC 8441), which an HTTP/1.1 upgrade is not translated into.
            done(UpstreamError("an HTTP/1.1 upgrade cannot be sent to an h2c server"))
            return
        if ex.deadline and ex.deadline <= perf_counter():
            done(UpstreamResponseTimeout("deadline passed before the request was sent"))
            return
        stream = H2Stream(self, ex, request_headers(ex, target), done)
        ex.upstream = stream
        self.busy.add(stream)
        waiting = self.waiting
        if not waiting.size:
            for conn in self.connections:
                if conn.has_room and conn.start(stream):
                    return
        if (
            waiting.size >= MAX_WAITING
            or waiting.waiting_for(stream) >= self.max_waiting_per_client
        ):
            stream.finish(NoStreamAvailable("too many requests waiting for a stream"))
            return
        stream.queued_at = asyncio.get_running_loop().time()
        self.waiting.append(stream)
        self._dial_if_needed()

    def restart(self, stream: H2Stream) -> None:
        """Send a refused stream again (H2Stream._replay): first in line for a stream."""
        if not self.waiting:
            for conn in self.connections:
                if conn.has_room and conn.start(stream):
                    return
        stream.queued_at = asyncio.get_running_loop().time()
        self.waiting.push_front(stream)
        self._dial_if_needed()

    def sweep(self, now: float) -> None:
        """Timeouts of streams (response head, deadline, queue wait), PINGs and idle
        connections; `now` on the loop's clock, seconds."""
        clock = perf_counter()
        for stream in list(self.busy):
            stream.check(now, clock)
        for conn in [*self.connections, *self.draining]:
            conn.check(now)

    def close(self) -> None:
        """The config no longer uses this server: idle connections close, busy ones drain
        (their streams finish on the snapshot that sent them)."""
        self.closing = True
        for conn in [*self.connections, *self.draining]:
            if conn.streams:
                conn.draining = True
                self.forget_for_new_streams(conn)
            else:
                conn.close()

    # -- connections ----------------------------------------------------------------------

    def forget(self, conn: H2UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self.draining.discard(conn)

    def forget_for_new_streams(self, conn: H2UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self.draining.add(conn)

    def unqueue(self, stream: H2Stream) -> None:
        self.waiting.remove(stream)

    def serve_waiting(self) -> None:
        """Give queued sends the streams that are free; dial if they need more."""
        waiting = self.waiting
        while waiting:
            conn = next((c for c in self.connections if c.has_room), None)
            if conn is None:
                break
            stream = waiting.popleft()
            if stream.ex.client_gone:
                stream.finish(ClientGone())
                continue
            if not conn.start(stream):
                waiting.put_back(stream)
        if waiting:
            self._dial_if_needed()

    def _dial_if_needed(self) -> None:
        if self.dialing or len(self.connections) + len(self.draining) >= self.max_connections:
            return
        if any(conn.has_room for conn in self.connections):
            return
        self.dialing = True
        task = asyncio.ensure_future(self._dial())
        _DIALS.add(task)
        task.add_done_callback(_DIALS.discard)

    async def _dial(self) -> None:
        """One new connection; the sends waiting get it once the server's SETTINGS arrive
        (`dialing` stays set until then), or its error."""
        try:
            conn = await self.dialer(self)
        except UpstreamConnectError as exc:
            self.dial_failed(exc)
            return
        if conn.closed or conn.ready:
            return  # it failed (dial_failed ran) or is ready (connection_ready ran) already
        self.connections.append(conn)

    def connection_ready(self, conn: H2UpstreamConnection) -> None:
        """The server's SETTINGS arrived on a new connection: the dial is over, and the
        sends waiting take their streams (maybe before the dialling task has even resumed)."""
        self.dialing = False
        if conn not in self.connections:
            self.connections.append(conn)
        self.serve_waiting()
        if self.closing:
            # Dialled for sends that waited when the config dropped this server: it serves
            # them, then closes (nothing sweeps a retired pool once its streams are over).
            conn.draining = True
            self.forget_for_new_streams(conn)
            if not conn.streams:
                conn.close()

    def dial_failed(self, error: UpstreamConnectError) -> None:
        """The dial, or the connection before the server's SETTINGS, failed: so does every
        send waiting for it (nothing was sent: retryable)."""
        self.dialing = False
        waiting, self.waiting = self.waiting, _WaitQueue()
        for stream in list(waiting):
            stream.finish(error)


async def dial_tcp(pool: H2Pool) -> H2UpstreamConnection:
    """A new TCP connection to the pool's server, within `dial_timeout`; raises
    UpstreamDialTimeout or UpstreamConnectError (nothing was sent)."""
    loop = asyncio.get_running_loop()
    settings = pool.settings
    host, port = resolve(pool.host, pool.port)  # `meshproxy local`: mesh names -> its proxy
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: H2UpstreamConnection(pool), host, port),
            settings.dial_timeout if settings.dial_timeout > 0 else None,
        )
    except TimeoutError:
        raise UpstreamDialTimeout(f"dial {pool.host}:{pool.port}: timeout") from None
    except OSError as exc:
        raise UpstreamConnectError(f"dial {pool.host}:{pool.port}: {exc}") from None
    return conn
