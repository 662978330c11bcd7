"""HTTP/2 server side (h2c): an asyncio Protocol driving the `h2` library (sans-IO).

Every stream a client opens becomes one `Exchange` whose sink is the stream (`H2Stream`), handed
to the entrypoint's handler exactly as an HTTP/1.1 request is: the routers, middlewares,
services and upstream pools never know the client spoke HTTP/2. A connection comes here from
the sniffer (prior knowledge: the client's first bytes are the preface, RFC 9113 §3.3) or from
an HTTP/1.1 connection that asked for `Upgrade: h2c` (RFC 7540 §3.2; see `upgrade_from_http1`).

What a request must be (RFC 9113 §8.1.1, §8.2, §8.3), checked per stream, and what breaking it
costs (a stream error only hits that stream, a connection error sends GOAWAY and closes):
- a field block that is malformed (uppercase or invalid field names, connection-specific
  fields, `te` other than `trailers`, missing/duplicate/unknown/misplaced pseudo-header
  fields, an empty `:path`, neither `:authority` nor `host`): RST_STREAM(PROTOCOL_ERROR),
  nothing forwarded. h2's own validation (`h2.utilities.validate_headers`) decides; it runs
  here, per stream, because h2 would turn it into a connection error (allowed by §5.4.1, but
  one bad request would then cost every stream of the connection);
- a `content-length` the DATA frames disagree with (§8.1.1): RST_STREAM(PROTOCOL_ERROR);
- a stream beyond MAX_CONCURRENT_STREAMS: RST_STREAM(REFUSED_STREAM) (§5.1.2; REFUSED_STREAM
  tells the client nothing was processed, §8.7: it may retry);
- a field block larger than the entrypoint's header limit: 431 on that stream (as Go's
  server); beyond twice that (or hpack's own bound), GOAWAY(ENHANCE_YOUR_CALM);
- a request the HTTP/1.1 side would refuse (invalid authority, fragment or broken
  percent-encoding in the path: 400, target too long: 414, refused encodings: 400, CONNECT
  other than RFC 8441's: 501, an unmeetable Expect: 417) gets the same status on its stream;
- connection errors, as h2 detects them (bad preface, frames over MAX_FRAME_SIZE, stream IDs
  going backwards, flow-control violations, HPACK errors...): GOAWAY with h2's error code,
  then the connection closes; every exchange on it ends as if its client left.

Flow control (RFC 9113 §5.2, §6.9): request DATA is acknowledged (WINDOW_UPDATE) only once it
is passed to the exchange and that exchange is not paused (`pause_request_body`), so a slow
backend stops only its own client stream. Bounds, in bytes: per stream, the request body held
is at most the stream window (`initial_window_size`, 256 KiB by default) plus what the exchange
buffers before an upstream attaches (`Exchange.body_high_water`); per connection, at most the
connection window (`CONNECTION_WINDOW`, 1 MiB) is unacknowledged. Response bodies the client's
window cannot take yet are queued per stream up to `RESPONSE_BUFFER` (64 KiB) beyond one read,
then that exchange's upstream is paused until a WINDOW_UPDATE drains it; a transport whose
write buffer is full pauses every stream's upstream.

Rapid reset (CVE-2023-44487): a stream the client resets before its response ended and within
`PREMATURE_RESET_SECONDS` of its start counts as premature; once a connection has opened
`RAPID_RESET_MIN_STREAMS` streams and half or more of them were reset prematurely, it gets
GOAWAY(ENHANCE_YOUR_CALM) and is closed. This is Envoy's rule (1.27.1:
`overload.premature_reset_total_stream_count` 500, `premature_reset_min_stream_lifetime_seconds`
1 s), with a lower count: a mesh client has no business cancelling most of its calls at once.
Go (x/net/http2, CVE-2023-39325) instead queues handlers beyond MAX_CONCURRENT_STREAMS and
closes the connection when the queue grows too long; nginx 1.25.3 caps the new streams
processed per event-loop iteration. Either way the cost of the attack is bounded per
connection; here, at most `RAPID_RESET_MIN_STREAMS` exchanges.

Floods of frames without request progress (CVE-2019-9512/9513/9515/9516/9518: PING, SETTINGS,
PRIORITY, WINDOW_UPDATE, unknown types, empty DATA, refused or malformed HEADERS) spend a
per-connection budget (`ServerH2Connection.spend`, `FLOOD_FRAMES`), earned back by requests and
response DATA and halved every second; past it, GOAWAY(ENHANCE_YOUR_CALM). h2 is handed at most
`FRAMES_PER_TURN` frames per loop turn (the client not read meanwhile), so one connection holds
the loop for milliseconds and the rapid-reset check acts within a read. A header block still
arriving is capped at twice the advertised header-list size (`HeaderBlockBuffer`).

Timeouts are checked by the entrypoint's sweep, once a second (`check_timeouts`): a connection
with no open stream for `idle_timeout` gets GOAWAY(NO_ERROR) and is closed; a request whose
body is still arriving `read_timeout` after its head gets 408 (or RST_STREAM if its response
started); an exchange that makes no progress either way for `idle_timeout` is ended.
Graceful shutdown (`shutdown`) sends GOAWAY(NO_ERROR) naming the last stream accepted and
closes the connection once those streams are done (RFC 9113 §6.8).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.utilities
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamClosedBy
from hpack.exceptions import HPACKError
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    GoAwayFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshproxy.http.exchange import Exchange
from meshproxy.http.fields import Fields, field_list
from meshproxy.http.forwarding import SERVER_NAME, UNTRUSTED_DROP
from meshproxy.http.grpc import abort_trailers, h2_refusal_fields, is_grpc
from meshproxy.http.request import Request
from meshproxy.http.server import valid_authority
from meshproxy.http2.compact_settings import compact_settings
from meshproxy.http2.hpack_memo import MemoDecoder, MemoEncoder
from meshproxy.http2.server_fields import plainly_valid, strict_request

if TYPE_CHECKING:
    from meshproxy.http.server import HTTPEntryPoint

log = logging.getLogger("meshproxy.http2")

DEFAULT_MAX_CONCURRENT_STREAMS = 250  # Traefik's entryPoints.X.http2.maxConcurrentStreams
DEFAULT_INITIAL_WINDOW_SIZE = 256 * 1024  # per stream, bytes (RFC 9113's default is 65,535)
DEFAULT_HEADER_TABLE_SIZE = 4096  # Traefik's maxDecoderHeaderTableSize/maxEncoderHeaderTableSize
CONNECTION_WINDOW = 1024 * 1024  # request body bytes unacknowledged per connection
RESPONSE_BUFFER = 64 * 1024  # response bytes queued per stream before its upstream pauses
RAPID_RESET_MIN_STREAMS = 200
PREMATURE_RESET_SECONDS = 1.0
# Frames that carry no request progress (see ServerH2Connection.spend) a connection may send
# beyond its credit before GOAWAY(ENHANCE_YOUR_CALM): Envoy's max_outbound_control_frames.
FLOOD_FRAMES = 1000
FLOOD_CREDIT_PER_REQUEST = 2  # frames a request legitimately brings (WINDOW_UPDATE, PING)
# Frames handed to h2 per event-loop turn: the rest waits for the next turn (reading paused),
# so one connection holds the loop for a few milliseconds at most, and the per-turn checks
# (rapid reset) act within that many frames.
FRAMES_PER_TURN = 100
# Client bytes an RFC 8441 tunnel holds before its backend answers; its window stops the rest.
_TUNNEL_HOLD = 64 * 1024

_CONNECTION_SPECIFIC = frozenset(
    # RFC 9113 §8.2.2: never sent on HTTP/2 (what an HTTP/1.1 peer used for its own hop)
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"http2-settings",
    }
)
_XF_BITS = {
    b"x-forwarded-proto": 1,
    b"x-forwarded-host": 2,
    b"x-forwarded-port": 4,
    b"x-real-ip": 8,
    b"x-forwarded-for": 16,
}
_MAGIC = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PREFACE_AND_TYPE = len(_MAGIC) + 4  # the magic, then a frame header's length and type
_SETTINGS_TYPE = 0x4
_REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILER_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False
)
_STATUS = {code: str(code).encode() for code in range(100, 1000)}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}


class StreamMalformed:
    """An event of our own: h2 found a stream's request malformed (its DATA disagrees with its
    content-length) and the stream was reset; its exchange must end."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class ServerH2Connection(h2.connection.H2Connection):
    """h2's connection with three server behaviours RFC 9113 allows and h2 does not offer.

    Each overrides one private frame handler of h2 4.x, so the conversation tests
    (tests/unit/test_h2_server_conversations.py) pin them: an h2 upgrade that changes them
    fails there, not in production.
    - a HEADERS frame beyond MAX_CONCURRENT_STREAMS refuses that stream with REFUSED_STREAM
      (§5.1.2) instead of h2's connection error; its field block is still decoded (§4.3: the
      HPACK state is the connection's);
    - DATA disagreeing with the content-length is a stream error (§8.1.1), not h2's
      connection error; the connection window is handed back for it;
    - a GOAWAY from the client leaves the connection open for the streams it already opened
      (§6.8), where h2 would refuse to send another byte.
    """

    # Closed stream ids h2 remembers to answer a late frame on them as RFC 9113 §5.1 says:
    # h2's default, 2**16, is ~120 bytes each, 7.5 MiB per long-lived connection once 65,536
    # streams have closed (bench/soak.py: +2.2 MB/min under 300 h2c req/s). A frame on an
    # older stream is answered as for a stream closed implicitly (RST_STREAM STREAM_CLOSED);
    # Go's server keeps none, and tells closed from idle by the highest stream id.
    MAX_CLOSED_STREAMS = 1024

    flood = 0  # frames without request progress, less the credit earned (see spend)
    more = False  # receive_data stopped at FRAMES_PER_TURN with frames left in the buffer
    _headers_stream: Any = None  # the h2 stream a HEADERS frame being received belongs to

    def receive_data(self, data: Any) -> Any:
        """h2's receive_data, handling at most FRAMES_PER_TURN frames; `more` says whether
        frames are left in the buffer (fed by the next call, even with no new data)."""
        events: list[Any] = []
        buffer = self.incoming_buffer
        buffer.add_data(data)
        buffer.max_frame_size = self.max_inbound_frame_size
        budget = FRAMES_PER_TURN
        self.more = False
        try:
            for frame in buffer:
                events.extend(self._receive_frame(frame))
                budget -= 1
                if not budget:
                    self.more = True
                    break
        except InvalidPaddingError as padding:
            self._terminate_connection(ErrorCodes.PROTOCOL_ERROR)
            raise h2.exceptions.ProtocolError("Received frame with invalid padding.") from padding
        except h2.exceptions.ProtocolError as exc:
            self._terminate_connection(exc.error_code)
            raise
        return events

    def _receive_frame(self, frame: Any) -> Any:
        kind = frame.__class__
        if kind in _NO_PROGRESS or (
            kind is DataFrame and not frame.data and "END_STREAM" not in frame.flags
        ):
            self.spend()
        return super()._receive_frame(frame)

    def spend(self) -> None:
        """Count one frame that carries no request progress (PING, SETTINGS, PRIORITY,
        WINDOW_UPDATE, unknown types, empty DATA without END_STREAM, a refused or malformed
        HEADERS: the CVE-2019-9512/9515/9518 floods). Past FLOOD_FRAMES beyond the credit that
        requests and response DATA earn (see H2ServerConnection), DenialOfServiceError:
        GOAWAY(ENHANCE_YOUR_CALM)."""
        self.flood += 1
        if self.flood > FLOOD_FRAMES:
            raise h2.exceptions.DenialOfServiceError("flood of frames without request progress")

    def _get_or_create_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        stream = super()._get_or_create_stream(stream_id, allowed_ids)
        self._headers_stream = stream  # its field block is decoded: HPACK state is whole
        return stream

    def _receive_headers_frame(self, frame: Any) -> Any:
        self._headers_stream = None
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError:
            pass
        except h2.exceptions.ProtocolError as exc:
            return self._headers_failed(frame, exc)
        stream_id = frame.stream_id
        highest = self.highest_inbound_stream_id
        if stream_id <= highest:
            raise h2.exceptions.StreamIDTooLowError(stream_id, highest)
        if stream_id % 2 == 0:
            raise h2.exceptions.ProtocolError("Invalid stream ID for peer.")
        events = self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        h2.connection._decode_headers(self.decoder, frame.data)
        self.highest_inbound_stream_id = stream_id
        self._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM
        refusal = RstStreamFrame(stream_id)
        refusal.error_code = ErrorCodes.REFUSED_STREAM
        self.spend()  # a refused stream is work for nothing too
        return [refusal], events

    def _headers_failed(self, frame: Any, exc: h2.exceptions.ProtocolError) -> Any:
        """A HEADERS frame h2 refused. An HPACK failure is COMPRESSION_ERROR (RFC 9113 §4.3);
        a block decoded whole but malformed for its stream (a `content-length` that is not
        one number, trailers without END_STREAM) is a stream error, RST_STREAM(PROTOCOL_ERROR)
        (§8.1.1): the HPACK state is intact, so the other streams go on. Anything else stays
        the connection error h2 made it."""
        stream = self._headers_stream
        self._headers_stream = None
        if isinstance(exc.__cause__, HPACKError) and type(exc) is h2.exceptions.ProtocolError:
            error = h2.exceptions.ProtocolError(str(exc))
            error.error_code = ErrorCodes.COMPRESSION_ERROR
            raise error from exc
        if stream is None or type(exc) is not h2.exceptions.ProtocolError:
            raise exc
        self.spend()
        try:
            self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.StreamClosedError:
            self._closed_streams[frame.stream_id] = StreamClosedBy.SEND_RST_STREAM
        return [], [StreamMalformed(frame.stream_id)]

    def _receive_data_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError:
            pass
        frames = []
        increment = self._inbound_flow_control_window_manager.process_bytes(
            frame.flow_controlled_length
        )
        if increment:
            update = WindowUpdateFrame(0)
            update.window_increment = increment
            frames.append(update)
        self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
        return frames, [StreamMalformed(frame.stream_id)]

    def _receive_goaway_frame(self, frame: Any) -> Any:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def graceful_goaway(self, last_stream_id: int) -> None:
        """Queue GOAWAY(NO_ERROR) naming `last_stream_id`, leaving the connection state open
        so the streams up to it can finish (h2's close_connection would end them all)."""
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = last_stream_id
        goaway.error_code = ErrorCodes.NO_ERROR
        self._prepare_for_sending([goaway])


_NO_PROGRESS = frozenset(
    {PingFrame, SettingsFrame, PriorityFrame, WindowUpdateFrame, ExtensionFrame}
)


class HeaderBlockBuffer(FrameBuffer):
    """h2's frame buffer with a bound, in bytes, on a header block still arriving (HEADERS
    then CONTINUATION frames without END_HEADERS): h2 alone keeps up to 64 frames, ~1 MiB at
    the default frame size, before it decodes anything. Past `limit` (twice the advertised
    MAX_HEADER_LIST_SIZE, what the HPACK decoder accepts decoded: an encoded block is never
    larger than its decoded size as RFC 9113 §6.5.2 counts it), DenialOfServiceError:
    GOAWAY(ENHANCE_YOUR_CALM) (RFC 9113 §10.5.1). `started` is when the block began
    (perf_counter seconds, 0 when none is pending): the read timeout bounds it."""

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self.limit = limit
        self.pending = 0  # bytes of the block so far
        self.started = 0.0

    def _update_header_buffer(self, f: Any) -> Any:
        frame = super()._update_header_buffer(f)
        parts = self._headers_buffer
        if not parts:
            self.pending = 0
            self.started = 0.0
            return frame
        if not self.started:
            self.started = time.perf_counter()
        self.pending += len(parts[-1].data)
        if self.pending > self.limit:
            raise h2.exceptions.DenialOfServiceError("header block over the advertised limit")
        return frame


class H2Stream:
    """One client stream and its exchange: the exchange's `Sink`.

    Response bytes the stream's window cannot take are queued here (`pending`, at most
    `RESPONSE_BUFFER` before the upstream is paused); request bytes passed on while the
    exchange is paused are counted in `unacked` and acknowledged on resume."""

    __slots__ = (
        "body_paused",
        "bogus_answer",
        "conn",
        "early",
        "end_pending",
        "ex",
        "head",
        "held",
        "pending",
        "pending_size",
        "progress",
        "progress_seen",
        "request_done",
        "response_done",
        "scheduled",
        "stalled_since",
        "stream_id",
        "tunnel",
        "unacked",
        "upstream_paused",
        "websocket",
    )

    def __init__(self, conn: H2ServerConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.ex: Exchange | None = None
        self.head: list[tuple[bytes, bytes]] | None = None  # held until body, end or flush
        self.held: list[bytes] = []  # body chunks not framed yet (see write_body)
        self.scheduled = False  # in the connection's list of streams to push
        self.pending: list[bytes] = []  # framed-to-be bytes the client's window holds back
        self.pending_size = 0
        self.end_pending = False  # write_end came while bytes were still queued
        self.upstream_paused = False  # paused because the client's window is closed
        self.body_paused = False  # the exchange asked to stop reading the request body
        self.unacked = 0
        self.request_done = False  # END_STREAM received (or the request ended otherwise)
        self.response_done = False  # END_STREAM sent, or the stream was reset
        self.progress = 0  # grows with every read and write: the sweep's stall check
        self.progress_seen = -1
        self.stalled_since = 0.0
        self.tunnel: Any = None  # an RFC 8441 tunnel's transport adapter, once switched
        self.websocket = False  # an RFC 8441 extended CONNECT
        self.bogus_answer = False  # its backend answered 2xx, not 101: 502 sent, body dropped
        self.early: list[bytes] = []  # its client DATA before the backend's answer

    # -- Sink ---------------------------------------------------------------------------------

    def write_head(
        self,
        ex: Exchange,
        status: int,
        headers: Fields,
        content_length: int | None,
        no_body: bool,
    ) -> None:
        if self.response_done:
            return
        if self.websocket and 200 <= status < 300:
            # RFC 8441 §5: a 2xx to an extended CONNECT says the tunnel is open. A backend
            # that answered the bridged WebSocket handshake with a 2xx instead of 101 opened
            # none: the client would read its body as WebSocket frames. 502, body dropped.
            log.info(
                "WebSocket backend answered %d, not 101: 502 to %s", status, self.conn.client_ip
            )
            self.bogus_answer = True
            self.head = [
                (b":status", b"502"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"11"),
            ]
            self.held = [b"Bad Gateway"]
            self.progress += 1
            return
        fields = [(b":status", _STATUS.get(status) or str(status).encode())]
        for name, value in field_list(headers):
            name = name.lower()
            if name not in _CONNECTION_SPECIFIC:
                fields.append((name, value))
        self.head = fields
        self.progress += 1

    def write_body(self, ex: Exchange, chunk: bytes) -> None:
        """Body bytes are framed at the end of the loop iteration (`H2ServerConnection.
        schedule`), or at once by `flush`/`write_end`: a response read whole from its backend
        leaves as HEADERS and one DATA frame carrying END_STREAM, and the streams answered in
        one iteration share one write."""
        if self.response_done or not chunk or self.bogus_answer:
            return
        self.progress += 1
        if self.pending:
            self._queue(chunk)  # the window is closed: after what waits already
            return
        self.held.append(chunk)
        if not self.scheduled:
            self.conn.schedule(self)

    def write_end(self, ex: Exchange) -> None:
        if self.response_done:
            return
        self.progress += 1
        self.push(True)
        self.conn.flush_soon()

    def flush(self, ex: Exchange) -> None:
        if not self.response_done:
            self.push(False)
            self.conn.flush_soon()

    def push(self, end: bool) -> None:
        """Give h2 the held head and body now, as far as the windows allow (the rest waits in
        `pending`); `end`: the response is complete, END_STREAM on its last frame, or its
        trailers after it."""
        if self.response_done:
            return
        try:
            self._push(end)
        except h2.exceptions.StreamClosedError:
            self.closed_under_us()

    def closed_under_us(self) -> None:
        """h2 has closed the stream already: the client's RST_STREAM came in the same read as
        what made us write (its StreamReset event, handled next, ends the exchange). Nothing
        more is written for it."""
        self.response_done = True
        self.held = []
        self.pending = []
        self.pending_size = 0
        self.head = None

    def _push(self, end: bool) -> None:
        held = self.held
        if held:
            self.held = []
        ex = self.ex
        trailers = (
            ex.response_trailers if end and ex is not None and not self.bogus_answer else None
        )
        end_with_data = end and not trailers
        if self.head is not None:
            if end_with_data and not held and not self.pending:
                self._send_head(True)
                self._response_ended()
                return
            self._send_head(False)
        conn = self.conn
        last = len(held) - 1
        for index, chunk in enumerate(held):
            if self.pending:
                self._queue(chunk)
                continue
            final = end_with_data and index == last
            sent = conn.send_data(self, chunk, final)
            if sent < len(chunk):
                self._queue(chunk[sent:] if sent else chunk)
            elif final:
                self._response_ended()
                return
        if end:
            if self.pending:
                self.end_pending = True  # sent once the window lets the rest through
                return
            self._end_now()

    def _end_now(self) -> None:
        ex = self.ex
        trailers = ex.response_trailers if ex is not None and not self.bogus_answer else None
        if trailers:
            self.conn.h2.send_headers(self.stream_id, _trailer_fields(trailers), end_stream=True)
        else:
            self.conn.h2.end_stream(self.stream_id)
        self._response_ended()

    def _send_head(self, end_stream: bool) -> None:
        head = self.head
        self.head = None
        assert head is not None
        self.conn.h2.send_headers(self.stream_id, head, end_stream=end_stream)

    def _response_ended(self) -> None:
        self.response_done = True
        if not self.request_done:
            # RFC 9113 §8.1: a complete response before the whole request; the client is told
            # to stop sending with RST_STREAM(NO_ERROR).
            self.conn.reset(self, ErrorCodes.NO_ERROR)
        self.conn.forget(self)

    def _queue(self, chunk: bytes) -> None:
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        if self.pending_size > RESPONSE_BUFFER and not self.upstream_paused:
            self.upstream_paused = True
            ex = self.ex
            if ex is not None and ex.upstream is not None and not self.conn.write_paused:
                ex.upstream.pause_reading()

    def drain(self) -> None:
        """The client's window opened: send what is queued, as far as it allows."""
        try:
            self._drain()
        except h2.exceptions.StreamClosedError:
            self.closed_under_us()

    def _drain(self) -> None:
        conn = self.conn
        while self.pending and not self.response_done:
            chunk = self.pending[0]
            sent = conn.send_data(self, chunk, False)
            if sent == 0:
                break
            self.pending_size -= sent
            if sent < len(chunk):
                self.pending[0] = chunk[sent:]
                break
            self.pending.pop(0)
        if self.pending or self.response_done:
            if self.tunnel is not None:
                self.tunnel.drained()
            return
        if self.end_pending:
            self.end_pending = False
            self._end_now()
        if self.tunnel is not None:
            self.tunnel.drained()
        if self.upstream_paused:
            self.upstream_paused = False
            ex = self.ex
            if ex is not None and ex.upstream is not None and not conn.write_paused:
                ex.upstream.resume_reading()

    def write_interim(self, ex: Exchange, status: int, headers: Fields) -> None:
        """A backend's 1xx (RFC 9113 §8.1: any number before the final HEADERS); never 101,
        which HTTP/2 does not have (§8.6)."""
        if status == 101 or ex.response_started or self.response_done or self.head is not None:
            return
        if status == 100:
            self.write_continue(ex)
            return
        fields = [(b":status", _STATUS.get(status) or str(status).encode())]
        fields += [(n.lower(), v) for n, v in field_list(headers) if n not in _CONNECTION_SPECIFIC]
        try:
            self.conn.h2.send_headers(self.stream_id, fields)
        except h2.exceptions.StreamClosedError:
            self.closed_under_us()
            return
        self.conn.flush()

    def write_continue(self, ex: Exchange) -> None:
        if (
            ex.request.expect_continue
            and not ex.continue_sent
            and not ex.response_started
            and not self.response_done
        ):
            ex.continue_sent = True
            try:
                self.conn.h2.send_headers(self.stream_id, [(b":status", b"100")])
            except h2.exceptions.StreamClosedError:
                self.closed_under_us()
                return
            self.conn.flush()

    def switch_protocols(
        self,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        upstream: asyncio.Transport,
        upstream_leftover: bytes,
        upstream_writing_paused: bool | None,
    ) -> None:
        """The backend accepted the WebSocket handshake of an RFC 8441 extended CONNECT:
        answer 200 on the stream and bridge it with the backend's socket (RFC 8441 §5)."""
        from meshproxy.http2.stream_tunnel import open_stream_tunnel

        open_stream_tunnel(self, ex, headers, upstream, upstream_leftover, upstream_writing_paused)

    def exchange_done(self, ex: Exchange) -> None:
        if self.tunnel is not None:
            return  # the byte pipe owns the stream from now on
        if not ex.finished:
            if self.response_done or self.conn.closed:
                ex.finished = True
            elif not ex.response_started:
                ex.respond(500, b"Internal Server Error")
            else:
                self.abort(ex)
                return
        self.conn.exchange_over(self)

    def abort(self, ex: Exchange) -> None:
        """The response cannot be completed. A gRPC call whose response started ends with
        a grpc-status trailer (UNAVAILABLE, or DEADLINE_EXCEEDED past its deadline: see
        http.grpc.abort_trailers), not a bare reset; anything else gets
        RST_STREAM(INTERNAL_ERROR)."""
        ex.finished = True
        upstream = ex.upstream
        if upstream is not None:
            upstream.client_gone()
        if self.response_done:
            return
        trailers = abort_trailers(ex) if ex.response_started else None
        if trailers is not None:
            # The messages the backend sent before it broke still go first (queued ones once
            # the client's window lets them), then the status.
            ex.response_trailers = trailers
            self.push(True)
        else:
            self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.conn.flush()

    def pause_request_body(self, ex: Exchange) -> None:
        self.body_paused = True
        if self.conn._h1_body:
            self.conn.update_reading()  # an upgrade's HTTP/1.1 body has no window to close

    def resume_request_body(self, ex: Exchange) -> None:
        if self.conn._h1_body:
            self.body_paused = False
            self.conn.update_reading()
        if self.body_paused:
            self.body_paused = False
            unacked, self.unacked = self.unacked, 0
            if unacked and not self.request_done:
                self.conn.acknowledge(self, unacked)
                self.conn.flush()


def _checked_fields(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """A request field block the fast path doubted: h2's validation (RFC 9113 §8.2, §8.3),
    then server_fields.strict_request's (tokens, CTLs, :path encoding); None if malformed.
    A `host` field is dropped when `:authority` is present: the request is routed by
    `:authority` (RFC 9113 §8.3.1; as Traefik/Go: nghttp2's tools send both, differing)."""
    if any(name == b":authority" for name, _ in headers):
        headers = [(name, value) for name, value in headers if name != b"host"]
    # a trailing empty cookie crumb would be refused below for its surrounding blank
    headers = [
        (name, _joined_cookie(value)) if name == b"cookie" else (name, value)
        for name, value in headers
    ]
    try:
        headers = list(h2.utilities.validate_headers(headers, _REQUEST_FLAGS))
    except h2.exceptions.ProtocolError:
        return None
    return strict_request(headers)


def _joined_cookie(value: bytes) -> bytes:
    """A `cookie` value as h2 joined its crumbs ("; ", RFC 9113 §8.2.3), without the empty
    crumbs: each is a valid field value (RFC 9110 §5.5), but joined they leave "; " at an end
    or twice in a row (Go forwards them so; a trailing one fails the field check)."""
    if value[:2] != b"; " and value[-2:] != b"; " and b"; ; " not in value:
        return value
    return b"; ".join([crumb for crumb in value.split(b"; ") if crumb.strip()])


def _trailer_fields(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v) for n, v in trailers if n.lower() not in _CONNECTION_SPECIFIC]


class H2ServerConnection(asyncio.Protocol):
    """One client's HTTP/2 connection (server side); see the module docstring."""

    def __init__(self, entry: HTTPEntryPoint) -> None:
        settings = entry.settings
        self.entry = entry
        self.entry_name = settings.name
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.draining = False  # GOAWAY(NO_ERROR) sent or received: no new streams
        self.write_paused = False
        self.client_ip = ""
        self.client_port = 0
        self.trusted = False
        self.idle_since = time.perf_counter()
        self.opened = 0  # streams accepted
        self.premature_resets = 0
        self._flushing = False
        self._counted = False
        self._h1_body = 0  # bytes of an h2c upgrade request's body still to come
        self._reading = True  # what update_reading last asked of the transport
        self._preface: bytes | None = b""  # the client's first bytes until SETTINGS is seen
        self._dirty: list[H2Stream] = []  # streams with body to push (see H2Stream.write_body)
        self._push_scheduled = False
        self._reset_now: set[int] | None = None  # streams the client reset in this read
        self.max_header_list = settings.h2_max_header_list_size or settings.max_header_bytes
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # per stream, in _on_request (stream errors)
            normalize_inbound_headers=True,  # cookies joined (RFC 9113 §8.2.3)
            validate_outbound_headers=False,  # our own fields, built right in write_head
            normalize_outbound_headers=False,
        )
        self.h2 = ServerH2Connection(config)
        # the same HPACK, remembering recurring field blocks (meshproxy/http2/hpack_memo.py)
        self.h2.encoder = MemoEncoder()
        self.h2.decoder = MemoDecoder(
            self.h2.decoder.max_header_list_size, self.h2.decoder.max_allowed_table_size
        )
        self.header_block = HeaderBlockBuffer(2 * self.max_header_list)
        self.h2.incoming_buffer = self.header_block
        self._backlog = False  # h2's buffer holds frames for the next turn (see _feed)
        self._settings_seen = False  # the client's first SETTINGS arrived (its preface is whole)
        self._compacted = False  # h2's settings deques replaced by short lists (check_timeouts)
        self.opened_at = time.perf_counter()
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.h2_max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.h2_initial_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.max_header_list,
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: settings.h2_max_decoder_table_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441 §3
            },
        )
        self._table_acked = False  # the client acknowledged our SETTINGS (header table size)
        # Settings given as initial values are in force at once (h2 treats them as already
        # acknowledged): the HPACK decoder must agree with them from the first frame.
        self._apply_local_limits()

    def _apply_local_limits(self) -> None:
        settings = self.entry.settings
        decoder = self.h2.decoder
        # Past the advertised limit a request gets 431 (its block still decoded, so the
        # HPACK state stays whole); hpack stops decoding only at twice that, which is a
        # connection error (GOAWAY ENHANCE_YOUR_CALM: RFC 9113 §10.5.1).
        decoder.max_header_list_size = 2 * self.max_header_list
        table = settings.h2_max_decoder_table_size
        if not self._table_acked:
            # RFC 9113 §6.5.3, RFC 7541 §4.2: a smaller table binds the client only once it
            # acknowledged our SETTINGS; its blocks before that may use the default 4096 bytes
            # (curl and h2load send their first request at once). Go and nghttp2 do the same.
            table = max(table, h2.settings.Settings().header_table_size)
        decoder.max_allowed_table_size = table

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._take(transport)  # type: ignore[arg-type]
        self.h2.initiate_connection()
        self._open_connection_window()
        self.flush()

    def _take(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
            if self.client_ip.startswith("::ffff:") and "." in self.client_ip:
                self.client_ip = self.client_ip[7:]
        self.trusted = self.entry.is_trusted(self.client_ip)
        self.entry.h2_connections.add(self)
        if not self._counted:
            self._counted = True
            self.entry.on_open(1)

    def _open_connection_window(self) -> None:
        # At least one stream's window: a single upload may use all of its own.
        target = max(CONNECTION_WINDOW, self.entry.settings.h2_initial_window_size)
        increment = target - self.h2.inbound_flow_control_window
        if increment > 0:
            self.h2.increment_flow_control_window(increment)

    def upgrade_from_http1(
        self, transport: asyncio.Transport, settings_header: bytes, ex: Exchange, rest: bytes
    ) -> None:
        """Continue an HTTP/1.1 connection whose request asked for `Upgrade: h2c` (RFC 7540
        §3.2), the 101 already written: the request becomes stream 1, half-closed (remote),
        and is served like any other stream. The HTTP/1.1 side already counted the
        connection as open. The HTTP/1.1 side upgrades only for settings h2 accepts
        (http.server.valid_h2_settings); should h2 still refuse them, the connection closes
        with GOAWAY(PROTOCOL_ERROR) (RFC 9113 §6.5.2), the request unserved, no exception
        escaping."""
        self._counted = True
        self._take(transport)
        # base64url with its padding left out, as RFC 7540 §3.2.1 has it; Python wants it.
        padded = settings_header + b"=" * (-len(settings_header) % 4)
        try:
            self.h2.initiate_upgrade_connection(padded)
        except (h2.exceptions.ProtocolError, ValueError) as exc:
            log.debug("h2c upgrade from %s with bad HTTP2-Settings: %s", self.client_ip, exc)
            self.entry.on_protocol_error(400)
            self.h2.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
            self.close()
            return
        self._open_connection_window()
        stream = H2Stream(self, 1)
        stream.request_done = not ex.has_body
        if ex.has_body:
            # Its body follows in HTTP/1.1 framing (Content-Length), then the preface (§3.2).
            self._h1_body = ex.request.content_length or 0
        self.streams[1] = stream
        self.opened += 1
        ex.sink = stream
        request = ex.request
        request.http_version = "2.0"
        # The HTTP/1.1 hop's own fields (Connection, Upgrade, HTTP2-Settings, those Connection
        # names) end here, as for every stream (RFC 9113 §8.2.2).
        dropped = _CONNECTION_SPECIFIC | request.connection_tokens
        request.headers = [(n, v) for n, v in request.headers if n not in dropped]
        request.connection_tokens = frozenset()
        request.verbatim = None
        request.keep_alive = True
        stream.ex = ex
        self.flush()
        self.entry.handler(ex)
        if rest and not self.closed:
            self.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # h2 keeps its frame handlers as bound methods: a reference cycle per connection that
        # only the garbage collector would find (issue 9: a closed connection leaves none).
        self.h2._frame_dispatch_table = {}
        self.entry.h2_connections.discard(self)
        if self._counted:
            self._counted = False
            self.entry.on_open(-1)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.response_done = True
            self._client_left(stream)
            if stream.ex is not None and stream.ex.handled:
                stream.ex = None  # no exchange_done to come: break the cycle now

    def close(self) -> None:
        """Close after writing what h2 has queued (a GOAWAY, last frames)."""
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            for stream in self.streams.values():
                stream.response_done = True  # nothing more is written for them
            data = self.h2.data_to_send()
            if data and not transport.is_closing():
                transport.write(data)
            transport.close()

    def shutdown(self) -> None:
        """Graceful close (RFC 9113 §6.8): GOAWAY(NO_ERROR) with the last stream accepted;
        the streams up to it finish, then the connection closes."""
        if self.closed or self.draining:
            return
        self.draining = True
        self.h2.graceful_goaway(self.h2.highest_inbound_stream_id)
        self.flush()
        if not self.streams:
            self.close()

    @property
    def current(self) -> Exchange | None:
        """An exchange still in progress, if any (the daemon's shutdown waits for none)."""
        for stream in self.streams.values():
            if stream.ex is not None:
                return stream.ex
        return None

    def check_timeouts(self, now: float, idle: float, read: float) -> None:
        """The entrypoint's sweep (seconds; 0 disables one): `idle` with no stream open (then
        GOAWAY and close) or for an exchange that made no progress either way; `read` for a
        request whose body is still arriving."""
        if self.closed:
            return
        h2conn = self.h2
        h2conn.flood >>= 1  # the flood budget is per burst: what was spent heals in seconds
        if read > 0:
            block_started = self.header_block.started
            if (not self._settings_seen and now - self.opened_at > read) or (
                block_started and now - block_started > read
            ):
                # A preface never completed, or a header block never ended, holds memory
                # and a connection for nothing: the read timeout bounds both, as the
                # sniffer's for a partial magic (Go's server: its preface timeout).
                log.debug(
                    "HTTP/2 connection from %s stalled in its preface or a header block",
                    self.client_ip,
                )
                self.close()
                return
        if not self.streams:
            if idle > 0 and now - self.idle_since > idle:
                self.shutdown()
                self.close()
            elif not self._compacted and self._settings_seen:
                # Once idle after the client's SETTINGS: a setting it adds later gets a
                # deque again (h2's __setitem__), a few per connection lifetime at most.
                self._compacted = True
                compact_settings(h2conn.local_settings)
                compact_settings(h2conn.remote_settings)
            return
        for stream in list(self.streams.values()):
            ex = stream.ex
            if ex is None or stream.tunnel is not None:
                continue
            if (
                read > 0
                and not stream.request_done
                and not stream.websocket  # its DATA is the tunnel's, not a request body
                and now - ex.started_at > read
            ):
                self._request_failed(stream, 408)  # RFC 9110 §15.5.9
                continue
            if stream.progress != stream.progress_seen:
                stream.progress_seen = stream.progress
                stream.stalled_since = now
            elif idle > 0 and now - stream.stalled_since > idle and not is_grpc(ex.request):
                # A gRPC stream may be quiet for long (a watch): its deadline (grpc-timeout)
                # and the client's keepalives bound it, as in Go's server, which has no
                # per-stream idle limit either.
                log.info("ending a stalled HTTP/2 exchange from %s", self.client_ip)
                self._request_failed(stream, 504 if not ex.response_started else 0)
        self.flush()

    # -- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._h1_body:
            data = self._upgrade_body(data)
            if not data:
                return
        if self._preface is not None:
            data = self._check_preface(data)
            if not data:
                return
        self._feed(data)

    def _continue(self) -> None:
        """The next turn's share of the frames left in h2's buffer."""
        if not self.closed:
            self._feed(b"")

    def _feed(self, data: bytes) -> None:
        """Give h2 `data` and handle what it makes of at most FRAMES_PER_TURN frames; the
        rest is handled in later loop turns, the client not read meanwhile (the bound of the
        work one connection does per turn, as nginx's per-iteration limits)."""
        h2conn = self.h2
        try:
            events = h2conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued the GOAWAY with the error's code (RFC 9113 §5.4.1), except for a bad
            # preface (§3.4), which it finds before its state machine runs.
            if exc.error_code == ErrorCodes.ENHANCE_YOUR_CALM:
                log.warning("HTTP/2 connection from %s closed: %s", self.client_ip, exc)
            else:
                log.debug("HTTP/2 connection error from %s: %s", self.client_ip, exc)
            if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                self.h2.close_connection(error_code=exc.error_code)
            self.entry.on_protocol_error(400)
            self.flush()
            self.close()
            return
        handlers = _HANDLERS
        reset_now: set[int] | None = None
        for event in events:
            if type(event) is h2.events.StreamReset:
                if reset_now is None:
                    reset_now = set()
                reset_now.add(event.stream_id)
        self._reset_now = reset_now
        self._flushing = True  # one write for everything these frames make us send
        try:
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
        finally:
            self._flushing = False
        self.flush()
        if h2conn.more != self._backlog and not self.closed:
            self._backlog = h2conn.more
            self.update_reading()
        if self._backlog and not self.closed:
            self.loop.call_soon(self._continue)

    def _check_preface(self, data: bytes) -> bytes:
        """RFC 9113 §3.4: the client's preface is the magic string then a SETTINGS frame; h2
        checks the magic only. Returns the bytes to feed h2 (none until the first frame's
        type is known, and none after a refusal: GOAWAY(PROTOCOL_ERROR), closed)."""
        buffered = self._preface + data  # type: ignore[operator]
        if not _MAGIC.startswith(buffered[: len(_MAGIC)]):
            self._preface = None
            return buffered  # not the magic: h2 refuses it
        if len(buffered) < _PREFACE_AND_TYPE:
            self._preface = buffered
            return b""
        self._preface = None
        if buffered[_PREFACE_AND_TYPE - 1] != _SETTINGS_TYPE:
            log.debug("HTTP/2 preface without SETTINGS from %s", self.client_ip)
            self.entry.on_protocol_error(400)
            self.h2.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
            self.close()
            return b""
        return buffered

    def _upgrade_body(self, data: bytes) -> bytes:
        """The body of the request that asked for the h2c upgrade (stream 1), still in
        HTTP/1.1 framing: passed to its exchange; returns the bytes after it (HTTP/2)."""
        take = min(self._h1_body, len(data))
        self._h1_body -= take
        stream = self.streams.get(1)
        ex = stream.ex if stream is not None else None
        if ex is not None and not ex.client_gone:
            stream.progress += 1  # type: ignore[union-attr]
            ex.on_request_body(data[:take] if take < len(data) else data)
            if not self._h1_body:
                stream.request_done = True  # type: ignore[union-attr]
                ex.on_request_end()
                self.update_reading()
        return data[take:]

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        reset_now = self._reset_now
        if reset_now is not None and stream_id in reset_now:
            # Reset in the same read (the rapid-reset pattern): never routed, but counted.
            self.opened += 1
            self._premature_reset()
            return
        stream = H2Stream(self, stream_id)
        stream.request_done = bool(event.stream_ended)
        if self.draining:
            # After our GOAWAY (§6.8): never processed, safe to retry elsewhere.
            self.reset(stream, ErrorCodes.REFUSED_STREAM)
            return
        self.streams[stream_id] = stream
        self.opened += 1
        h2conn = self.h2
        if h2conn.flood:  # a request earns the frames that go with one (see spend)
            h2conn.flood = max(0, h2conn.flood - FLOOD_CREDIT_PER_REQUEST)
        headers = event.headers
        if not plainly_valid(headers):  # the usual request needs no more (server_fields)
            checked = _checked_fields(headers)
            if checked is None:
                log.debug("malformed HTTP/2 request from %s", self.client_ip)
                self._refuse(stream, ErrorCodes.PROTOCOL_ERROR)
                return
            headers = checked
        status = self._start_exchange(stream, headers, not event.stream_ended)
        if status:
            self._answer_locally(stream, status, headers)

    def _start_exchange(
        self, stream: H2Stream, headers: list[tuple[bytes, bytes]], has_body: bool
    ) -> int:
        """Build the request of `stream` and hand it to the entrypoint; the status of a local
        refusal instead (0 if none)."""
        settings = self.entry.settings
        method = path = authority = host = protocol = b""
        fields: list[tuple[bytes, bytes]] = []
        size = 0
        xf_seen = 0
        content_length: int | None = None
        expect = te_trailers = False
        for name, value in headers:
            size += len(name) + len(value) + 32  # RFC 9113 §6.5.2's accounting
            if name[0] == 58:  # b":"
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                elif name == b":protocol":
                    protocol = value
                continue  # :scheme: the entrypoint's scheme is what X-Forwarded-Proto says
            if name in UNTRUSTED_DROP:
                if not self.trusted:
                    continue
                xf_seen |= _XF_BITS.get(name, 0)
            elif name == b"host":
                host = value
                continue  # carried as the request's authority (host_header)
            elif name == b"content-length":
                content_length = int(value)  # h2 checked it is a number
            elif name == b"te":
                te_trailers = True  # h2's validation allows only `trailers`
            elif name == b"cookie":
                value = _joined_cookie(value)
            elif name == b"expect":
                if value.lower() != b"100-continue":
                    return 417  # RFC 9110 §10.1.1
                expect = True
            fields.append((name, value))
        if size > self.max_header_list:
            return 431  # RFC 6585 §5, as Go's server answers
        if method == b"CONNECT":
            if protocol.lower() != b"websocket":
                return 501  # RFC 9110 §9.3.6: no tunnels; RFC 8441: only WebSocket
        elif content_length and not has_body and method != b"HEAD":
            self._refuse(stream, ErrorCodes.PROTOCOL_ERROR)  # §8.1.1: no DATA after all
            return 0
        authority = authority or host
        if not valid_authority(authority):
            return 400  # RFC 3986 §3.2.2, as the HTTP/1.1 side
        if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            self._refuse(stream, ErrorCodes.PROTOCOL_ERROR)  # §8.3.1: origin-form or "*"
            return 0
        if b"#" in path:
            return 400  # a fragment is never sent (CVE-2023-47106)
        if len(path) > settings.max_target_bytes:
            return 414
        refused = settings.refused_encodings
        if refused and b"%" in path:
            upper = path.partition(b"?")[0].upper()
            for encoded in refused:
                if encoded in upper:
                    return 400
        websocket = method == b"CONNECT"
        if websocket:
            method = b"GET"
            has_body = False  # the stream's DATA is the tunnel's, after the backend's 101
        try:
            request = Request(
                _METHODS.get(method) or method.decode("latin-1"),
                path,
                fields,
                authority,
                self.client_ip,
                self.client_port,
                "2.0",
                sanitize_path=settings.sanitize_path,
            )
        except ValueError:
            return 400
        request.content_length = content_length
        request.te_trailers = te_trailers
        request.expect_continue = expect
        if websocket:
            from meshproxy.http2.stream_tunnel import websocket_request

            websocket_request(request)
        if xf_seen & 31:
            self._add_forwarded_fields(request, xf_seen)
        else:
            fields.extend(
                self.entry.forwarded_fields(request.host_header, request.port, self.client_ip)[1]
            )
        ex = Exchange(stream, request, self.entry_name, time.perf_counter(), has_body)
        stream.ex = ex
        if websocket:
            stream.request_done = False
            stream.websocket = True
        if has_body:
            # Let this read's DATA reach the exchange first: a local answer (404, 503) then
            # finds a small body read, and needs no RST_STREAM to stop it (as HTTP/1.1 does).
            self.loop.call_soon(self._handle, ex)
        else:
            self.entry.handler(ex)
        return 0

    def _handle(self, ex: Exchange) -> None:
        if not ex.client_gone and not self.closed:
            self.entry.handler(ex)

    def _add_forwarded_fields(self, request: Request, seen: int) -> None:
        """A trusted client sent some X-Forwarded-* fields: add only the missing ones (as the
        HTTP/1.1 side)."""
        headers = request.headers
        entry = self.entry
        if not seen & 1:
            headers.append((b"x-forwarded-proto", entry.proto_value))
        if not seen & 2 and request.host_header:
            headers.append((b"x-forwarded-host", request.host_header))
        if not seen & 4:
            port = request.port.encode() if request.port else entry.default_port
            headers.append((b"x-forwarded-port", port))
        headers.append((b"x-forwarded-server", SERVER_NAME))
        if not seen & 8:
            headers.append((b"x-real-ip", self.client_ip.encode()))
        request.forwarded_for = bool(seen & 16)

    def _answer_locally(
        self, stream: H2Stream, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """A request refused before routing: `status` on its stream, nothing forwarded; a
        gRPC call gets it as a Trailers-Only status (http.grpc.h2_refusal_fields)."""
        self.entry.on_protocol_error(status)
        message = b"%d %s" % (status, _reason(status))
        grpc_fields = h2_refusal_fields(headers, status, message.decode()) if headers else None
        if grpc_fields is not None:
            stream.head = grpc_fields
            stream.push(True)
            return
        stream.head = [
            (b":status", _STATUS[status]),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(message)).encode()),
        ]
        stream.held = [message]
        stream.push(True)

    def _refuse(self, stream: H2Stream, code: ErrorCodes) -> None:
        self.entry.on_protocol_error(400)
        self.reset(stream, code)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if stream is None or stream.ex is None or (stream.response_done and stream.tunnel is None):
            # A stream we are done with (answered, reset): its bytes still count against the
            # connection window, which must be handed back.
            self.h2.acknowledge_received_data(size, event.stream_id)
            return
        stream.progress += 1
        if stream.tunnel is not None:
            stream.tunnel.data_from_client(event.data, size)
            return
        if stream.websocket:
            # Tunnel bytes sent before the backend answered (RFC 8441 §5): held, and left
            # unacknowledged, so the stream's window bounds them; relayed after a 101.
            stream.early.append(event.data)
            stream.unacked += size
            return
        ex = stream.ex
        if event.data:
            ex.on_request_body(event.data)
        if stream.body_paused:
            stream.unacked += size
        elif size:
            self.h2.acknowledge_received_data(size, event.stream_id)

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        if stream.tunnel is not None:
            stream.tunnel.eof_from_client()
            return
        stream.request_done = True
        ex = stream.ex
        if ex is not None and ex.has_body and not ex.body_complete:
            ex.on_request_end()

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.ex is None:
            return
        try:
            trailers = list(h2.utilities.validate_headers(event.headers, _TRAILER_FLAGS))
        except h2.exceptions.ProtocolError:
            self._request_failed(stream, 0, ErrorCodes.PROTOCOL_ERROR)
            return
        stream.ex.request_trailers = [(n, v) for n, v in trailers if n not in UNTRUSTED_DROP]

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        """The client reset a stream (RFC 9113 §6.4): its exchange ends as if the client left;
        the rapid-reset bound counts it (see the module docstring)."""
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        stream.response_done = True
        ex = stream.ex
        premature = (
            ex is not None
            and not ex.finished
            and time.perf_counter() - ex.started_at < PREMATURE_RESET_SECONDS
        )
        self._client_left(stream)
        if premature and self._premature_reset():
            return
        self._maybe_close()

    def _premature_reset(self) -> bool:
        """Count a stream the client reset before its response ended; True when that makes
        the rapid-reset bound close the connection (GOAWAY ENHANCE_YOUR_CALM)."""
        self.premature_resets += 1
        if self.opened < RAPID_RESET_MIN_STREAMS or 2 * self.premature_resets < self.opened:
            return False
        log.warning("rapid reset from %s: connection closed", self.client_ip)
        self.entry.on_protocol_error(400)
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self.close()
        return True

    def _on_malformed(self, event: StreamMalformed) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            self.entry.on_protocol_error(400)
            stream.response_done = True
            ex = stream.ex
            if ex is not None:
                ex.request_error = 400
            self._client_left(stream)

    def _client_left(self, stream: H2Stream) -> None:
        """End `stream`'s exchange as the HTTP/1.1 side does when its client leaves."""
        stream.held = []
        stream.pending = []
        stream.pending_size = 0
        tunnel = stream.tunnel
        if tunnel is not None:
            tunnel.stream_closed()
            return
        ex = stream.ex
        if ex is None:
            return
        if not ex.finished:
            ex.client_gone = True
        upstream = ex.upstream
        if upstream is not None:
            upstream.client_gone()
        waiter = ex.body_waiter
        if waiter is not None:
            ex.body_waiter = None
            waiter()

    def _request_failed(self, stream: H2Stream, status: int, code: int = ErrorCodes.CANCEL) -> None:
        """End a request that can no longer be read (timeout: `status` 408) or stalled:
        `status` on the stream if no response started (0: reset with `code`)."""
        ex = stream.ex
        if ex is None:
            return
        ex.request_error = status or 502
        if status and not ex.response_started and not stream.response_done:
            ex.finished = True
            self._answer_locally(stream, status, ex.request.headers)
        else:
            ex.finished = True
            self.reset(stream, code)
        self.streams.pop(stream.stream_id, None)
        self._client_left(stream)

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        stream_id = event.stream_id
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.pending:
                stream.drain()
            return
        for stream in list(self.streams.values()):  # the connection window opened
            if stream.pending:
                stream.drain()

    def _on_remote_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._settings_seen = True
        table = event.changed_settings.get(h2.settings.SettingCodes.HEADER_TABLE_SIZE)
        limit = self.entry.settings.h2_max_encoder_table_size
        if table is not None and table.new_value > limit:
            # Traefik's maxEncoderHeaderTableSize: the client may offer a larger table than
            # we are willing to keep for it.
            self.h2.encoder.header_table_size = limit
        # INITIAL_WINDOW_SIZE may have opened every stream's window.
        for stream in list(self.streams.values()):
            if stream.pending:
                stream.drain()

    def _on_settings_acked(self, event: h2.events.SettingsAcknowledged) -> None:
        self._table_acked = True
        self._apply_local_limits()  # h2 reset the decoder's limits to the advertised ones

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The client is going away (RFC 9113 §6.8): no new streams; with an error, every
        stream ends now, else the connection closes once its streams are done."""
        self.draining = True
        if event.error_code != ErrorCodes.NO_ERROR:
            self.close()
            return
        self._maybe_close()

    # -- writing ----------------------------------------------------------------------------

    def send_data(self, stream: H2Stream, chunk: bytes, end: bool = False) -> int:
        """Send as much of `chunk` as the windows allow, in frames of the client's maximum
        size, END_STREAM on the last if `end` and all of it went; returns the bytes sent."""
        h2conn = self.h2
        stream_id = stream.stream_id
        window = h2conn.local_flow_control_window(stream_id)
        if window <= 0:
            return 0
        size = len(chunk)
        frame = h2conn.max_outbound_frame_size
        if h2conn.flood:
            # A DATA frame sent may bring a WINDOW_UPDATE back (Envoy allows 10 per DATA
            # frame sent): one frame's credit per send.
            h2conn.flood -= 1
        if size <= window and size <= frame:
            h2conn.send_data(stream_id, chunk, end_stream=end)
            return size
        sent = 0
        limit = min(size, window)
        view = memoryview(chunk)
        while sent < limit:
            step = min(frame, limit - sent)
            sent += step
            h2conn.send_data(
                stream_id, bytes(view[sent - step : sent]), end_stream=end and sent == size
            )
        return sent

    def schedule(self, stream: H2Stream) -> None:
        """Push `stream`'s held body at the end of this loop iteration (see write_body)."""
        stream.scheduled = True
        self._dirty.append(stream)
        if not self._push_scheduled:
            self._push_scheduled = True
            self.loop.call_soon(self._push_dirty)

    def _push_dirty(self) -> None:
        self._push_scheduled = False
        dirty, self._dirty = self._dirty, []
        if self.closed:
            return
        for stream in dirty:
            stream.scheduled = False
            stream.push(False)
        self.flush()

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        self.h2.acknowledge_received_data(size, stream.stream_id)

    def reset(self, stream: H2Stream, code: int) -> None:
        """RST_STREAM with `code` unless the stream is already closed both ways."""
        stream.response_done = True
        stream.held = []
        stream.pending = []
        stream.pending_size = 0
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass
        self.forget(stream)
        self.flush()

    def forget(self, stream: H2Stream) -> None:
        """The stream's response is over (sent or reset): once its exchange is over too
        (`exchange_over`), it leaves the connection."""
        ex = stream.ex
        if ex is None or ex.handled:
            self.streams.pop(stream.stream_id, None)
            stream.ex = None  # no exchange/stream cycle left behind
            self._maybe_close()

    def exchange_over(self, stream: H2Stream) -> None:
        """The serving side is done with the stream's exchange (`exchange_done`)."""
        if stream.response_done and not stream.pending:
            self.streams.pop(stream.stream_id, None)
        if self.streams.get(stream.stream_id) is not stream:
            stream.ex = None  # exchange and stream point at each other: no cycle left behind
        self.idle_since = time.perf_counter()
        self._maybe_close()

    def tunnel_closed(self) -> None:
        """An RFC 8441 tunnel's stream is over (meshproxy.http2.stream_tunnel)."""
        self.flush()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if not self.streams:
            self.idle_since = time.perf_counter()
            if self.draining:
                self.flush()
                self.close()

    def flush_soon(self) -> None:
        """Write what h2 holds now, or with the push already due this loop iteration (so the
        streams answered in one iteration share one socket write)."""
        if not self._push_scheduled:
            self.flush()

    def flush(self) -> None:
        if self._flushing or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    # -- flow control: a slow client slows its upstreams -------------------------------------

    def update_reading(self) -> None:
        """Read from the client unless its socket's write buffer is full (it does not read
        what we send: PING and SETTINGS acknowledgements must not pile up without bound, the
        flood attacks of CVE-2019-9512/9515) or the body of an h2c upgrade request is paused
        (it has no window)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        stream = self.streams.get(1) if self._h1_body else None
        want = (
            not self.write_paused
            and not self._backlog
            and not (stream is not None and stream.body_paused)
        )
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.update_reading()
        for stream in self.streams.values():
            ex = stream.ex
            if stream.tunnel is not None:
                stream.tunnel.transport_paused(True)
            elif ex is not None and ex.upstream is not None and not stream.upstream_paused:
                ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_reading()
        for stream in list(self.streams.values()):
            ex = stream.ex
            if stream.tunnel is not None:
                stream.tunnel.transport_paused(False)
            elif ex is not None and ex.upstream is not None and not stream.upstream_paused:
                ex.upstream.resume_reading()


# What each h2 event does: unbound functions (bound methods kept on the connection would make
# it a reference cycle the garbage collector has to find).
_HANDLERS: dict[type, Callable[[H2ServerConnection, Any], None]] = {
    h2.events.RequestReceived: H2ServerConnection._on_request,
    h2.events.DataReceived: H2ServerConnection._on_data,
    h2.events.StreamEnded: H2ServerConnection._on_stream_ended,
    h2.events.StreamReset: H2ServerConnection._on_stream_reset,
    h2.events.TrailersReceived: H2ServerConnection._on_trailers,
    h2.events.WindowUpdated: H2ServerConnection._on_window_updated,
    h2.events.ConnectionTerminated: H2ServerConnection._on_goaway,
    h2.events.RemoteSettingsChanged: H2ServerConnection._on_remote_settings,
    h2.events.SettingsAcknowledged: H2ServerConnection._on_settings_acked,
    StreamMalformed: H2ServerConnection._on_malformed,
}


def _reason(status: int) -> bytes:
    from meshproxy.http.status import reason_phrase

    return reason_phrase(status)
