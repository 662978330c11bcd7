"""The byte pipe (meshproxy/l4/pipe.py) as conversations over in-memory transports: bytes,
EOFs, resets and clock ticks in; bytes, EOFs, closes and the `on_closed` report out.

`MemoryTransport` keeps asyncio's transport contract (the one uvloop keeps too): a write
buffer the test's peer drains by reading, `pause_writing` above the high-water mark and
`resume_writing` at the low one, `write_eof` and `close` only after the buffer is flushed,
`abort` dropping it, `connection_lost` delivered on a later loop iteration to whichever
protocol is installed then. It refuses what a real transport punishes: a write after
`write_eof` or `close`, and resuming reading after EOF (a socket transport would read the EOF
again). Time is a virtual clock: `advance(seconds)` runs the timers that fall due, without
sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from meshproxy.l4.pipe import (
    END_ABORTED,
    END_CLOSED,
    END_EOF,
    END_IDLE,
    END_OWNER,
    END_RESET,
    END_TERMINATION,
    BytePipe,
    PipeEnd,
    PipeSettings,
    PipeStats,
)


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def run(scenario: Callable[[ClockLoop], Coroutine[Any, Any, None]]) -> None:
    loop = ClockLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


async def settle() -> None:
    """Let callbacks scheduled with call_soon (connection_lost...) run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def advance(loop: ClockLoop, seconds: float) -> None:
    loop.now += seconds
    await settle()


class MemoryTransport(asyncio.Transport):
    """One connection as the pipe sees it; the methods under "the peer" are what the remote
    end does."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, high: int = 64, low: int = 16, half_close=True
    ) -> None:
        super().__init__()
        self.loop = loop
        self.high, self.low = high, low
        self.half_close = half_close
        self.protocol: asyncio.BaseProtocol = asyncio.Protocol()
        self.buffer = bytearray()  # written by the pipe, not yet read by the peer
        self.received = bytearray()  # what the peer has read
        self.peer_got_eof = False
        self.eof_wanted = False
        self.closing = False
        self.aborted = False
        self.lost = False
        self.reading = True
        self.protocol_paused = False
        self.inbox: list[bytes | None] = []  # what the peer sent while reading was paused
        self.eof_delivered = False
        self.reading_calls: list[str] = []

    # -- the transport interface -----------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "write() after close()"
        assert not self.eof_wanted, "write() after write_eof()"
        self.buffer += data
        if len(self.buffer) > self.high and not self.protocol_paused:
            self.protocol_paused = True
            self.protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        assert self.half_close and not self.closing
        self.eof_wanted = True
        self._flushed()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._flushed()

    def abort(self) -> None:
        self.aborted = True
        self.closing = True
        self.buffer.clear()
        self._lose(None)

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading_calls.append("pause")
        self.reading = False

    def resume_reading(self) -> None:
        self.reading_calls.append("resume")
        assert not self.eof_delivered, "resume_reading() after EOF: the EOF would be read again"
        self.reading = True
        inbox, self.inbox = self.inbox, []
        for item in inbox:
            self.feed(item) if item is not None else self.feed_eof()

    # -- the peer ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """The peer sends `data`; it waits in the kernel while reading is paused."""
        if not self.reading or self.inbox:
            self.inbox.append(data)
        elif not self.closing:
            self.protocol.data_received(data)  # type: ignore[attr-defined]

    def feed_eof(self) -> None:
        """The peer shuts its write side (FIN)."""
        if not self.reading or self.inbox:
            self.inbox.append(None)
            return
        if self.closing:
            return
        self.eof_delivered = True
        if not self.protocol.eof_received():  # type: ignore[attr-defined]
            self.close()

    def reset(self) -> None:
        """The peer resets the connection (RST)."""
        self.closing = True
        self.buffer.clear()
        self._lose(ConnectionResetError("connection reset by peer"))

    def read(self, size: int | None = None) -> bytes:
        """The peer reads up to `size` bytes (all by default) of what was written to it."""
        size = len(self.buffer) if size is None else size
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.received += data
        if self.protocol_paused and len(self.buffer) <= self.low:
            self.protocol_paused = False
            self.protocol.resume_writing()
        self._flushed()
        return data

    # -- internals ---------------------------------------------------------------------------

    def _flushed(self) -> None:
        if self.buffer:
            return
        if self.eof_wanted:
            self.peer_got_eof = True
        if self.closing:
            self.peer_got_eof = True
            self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            # asyncio and uvloop call the protocol installed when the callback runs
            self.loop.call_soon(lambda: self.protocol.connection_lost(exc))


class Conversation:
    """A pipe between two memory transports, recording its `on_closed` calls."""

    def __init__(
        self,
        loop: ClockLoop,
        settings: PipeSettings | None = None,
        down: dict[str, Any] | None = None,
        up: dict[str, Any] | None = None,
        transports: dict[str, Any] | None = None,
    ) -> None:
        self.down = MemoryTransport(loop, **(transports or {}))
        self.up = MemoryTransport(loop, **(transports or {}))
        self.closed: list[PipeStats] = []
        self.pipe = BytePipe(
            PipeEnd(self.down, **(down or {})),
            PipeEnd(self.up, **(up or {})),
            settings or PipeSettings(idle_timeout=0),
            self.closed.append,
        )

    def start(self) -> Conversation:
        self.pipe.start()
        return self


# ---------------------------------------------------------------- relaying


def test_bytes_flow_both_ways_in_order():
    """A pipe relays each side's bytes to the other unchanged and in order (a TCP stream,
    RFC 9293 §3.1), with no close before anyone ends."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.down.feed(b"GET / ")
        c.down.feed(b"please")
        c.up.feed(b"here ")
        c.up.feed(b"you are")
        await settle()
        assert c.up.read() == b"GET / please"
        assert c.down.read() == b"here you are"
        assert not c.down.closing and not c.up.closing and c.closed == []

    run(scenario)


def test_leftovers_are_replayed_first_then_relaying_continues():
    """Hand-over after an HTTP/1.1 101 (RFC 9110 §15.2.2): bytes already read from each side
    (after the request head, after the 101 head) reach the other side before anything read
    later; reading is resumed on both sides even if the caller had paused it."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, down={"leftover": b"frame-1"}, up={"leftover": b"hello"})
        c.down.pause_reading()
        c.up.pause_reading()
        c.start()
        assert c.down.reading and c.up.reading
        c.down.feed(b"frame-2")
        c.up.feed(b"world")
        assert c.up.read() == b"frame-1frame-2"
        assert c.down.read() == b"helloworld"
        assert c.pipe.stats is None

    run(scenario)


def test_the_pipe_takes_over_the_transports_protocols():
    """After start() the caller's protocol gets no more events: the pipe owns both."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop)
        before_down, before_up = c.down.protocol, c.up.protocol
        c.start()
        assert c.down.protocol is not before_down and c.up.protocol is not before_up
        with pytest.raises(RuntimeError):
            c.pipe.start()

    run(scenario)


# ---------------------------------------------------------------- half-close and the end


def test_client_eof_half_closes_the_server_and_the_reply_still_flows():
    """RFC 9293 §3.6 half-close, as Traefik's TCP proxy relays it (CloseWrite): the client's
    EOF becomes write_eof() on the server, the server's reply still reaches the client, and
    the server's EOF then ends the pipe: both closed, on_closed called once, reason eof."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.down.feed(b"request")
        c.down.feed_eof()
        assert c.up.read() == b"request" and c.up.peer_got_eof
        assert not c.up.closing and not c.down.closing
        c.up.feed(b"reply")
        c.up.feed_eof()
        assert c.down.read() == b"reply" and c.down.peer_got_eof
        await settle()
        assert c.down.lost and c.up.lost
        assert c.closed == [PipeStats(END_EOF, 7, 5, 0.0)]
        assert await c.pipe.wait_closed() == c.closed[0]

    run(scenario)


def test_server_eof_first_keeps_the_client_direction_open():
    """The other direction: a server that speaks first and shuts its write side; the client
    sees EOF and can still send, which the server receives; the client's EOF ends the pipe."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.up.feed(b"220 ready")
        c.up.feed_eof()
        assert c.down.read() == b"220 ready" and c.down.peer_got_eof
        c.down.feed(b"QUIT")
        assert c.up.read() == b"QUIT"
        assert c.closed == []
        c.down.feed_eof()
        await settle()
        assert c.closed[0].reason == END_EOF and c.down.lost and c.up.lost

    run(scenario)


def test_eofs_seen_before_the_hand_over_are_passed_on():
    """PipeEnd.eof: the caller read a side's EOF before the hand-over; the pipe passes it on
    after the leftovers, and with both EOFs known it ends once the leftovers are delivered."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(
            loop,
            down={"leftover": b"last words", "eof": True},
            up={"leftover": b"bye", "eof": True},
        ).start()
        assert c.up.closing and c.down.closing
        assert not c.up.lost  # close() waits for the buffered bytes
        assert c.up.read() == b"last words" and c.down.read() == b"bye"
        await settle()
        assert [s.reason for s in c.closed] == [END_EOF]
        assert (c.closed[0].bytes_from_downstream, c.closed[0].bytes_from_upstream) == (10, 3)

    run(scenario)


def test_a_side_that_cannot_half_close_keeps_the_other_direction_flowing():
    """TLS half-closes (RFC 8446 §6.1: close_notify closes the sender's write side; Traefik's
    TCP proxy CloseWrite()s a tls.Conn), but asyncio's SSL transport cannot write_eof. The
    client's EOF is then not passed on, and the server's answer still reaches the client
    (fresh-tcp F-TCP-3: Traefik delivered it, meshproxy ended the pipe and lost it); the pipe
    ends, reason eof, when the server ends too."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, transports={"half_close": False}).start()
        c.down.feed(b"request")
        c.down.feed_eof()
        await settle()
        assert not c.up.closing and not c.down.closing
        assert c.up.read() == b"request" and not c.up.eof_wanted
        c.up.feed(b"answer")
        assert c.down.read() == b"answer"
        c.up.feed_eof()
        assert c.up.closing and c.down.closing
        await settle()
        assert [s.reason for s in c.closed] == [END_EOF]
        assert (c.closed[0].bytes_from_downstream, c.closed[0].bytes_from_upstream) == (7, 6)

    run(scenario)


def test_a_server_eof_toward_a_client_that_cannot_half_close_ends_the_pipe():
    """The other way, the server's EOF toward a TLS client (a TLS-terminating TCP router)
    ends the pipe after what is buffered: it often delimits the answer (a close-delimited
    body), and a client that cannot be half-closed learns it only from the close."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, transports={"half_close": False}).start()
        c.up.feed(b"pong")
        c.up.feed_eof()
        assert c.up.closing and c.down.closing
        assert c.down.read() == b"pong"
        await settle()
        assert [s.reason for s in c.closed] == [END_EOF]

    run(scenario)


def test_termination_delay_bounds_the_wait_after_an_eof_that_cannot_be_passed_on():
    """Traefik's terminationDelay (pkg/tcp/proxy.go: a deadline on the other side after one
    direction ended) applies the same when the EOF could not be passed on (TLS): the pipe
    ends `termination delay` later, and the idle timeout still ends a silent one."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(
            loop,
            settings=PipeSettings(idle_timeout=0, termination_delay=0.1),
            transports={"half_close": False},
        ).start()
        c.down.feed_eof()
        await advance(loop, 0.05)
        c.up.feed(b"late")
        assert c.down.read() == b"late" and not c.closed and not c.down.closing
        await advance(loop, 0.06)
        assert c.up.closing and c.down.closing
        await settle()
        assert [s.reason for s in c.closed] == [END_TERMINATION]
        idle = Conversation(
            loop, settings=PipeSettings(idle_timeout=5), transports={"half_close": False}
        ).start()
        idle.down.feed_eof()
        await advance(loop, 4.9)
        assert not idle.down.closing
        await advance(loop, 0.2)
        await settle()
        assert [s.reason for s in idle.closed] == [END_IDLE]

    run(scenario)


def test_a_reset_closes_the_other_side_after_flushing():
    """A peer reset (connection_lost with an error) ends the pipe: the other connection is
    closed (what it buffered is still sent first), reason reset, on_closed once."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.down.feed(b"partial")
        c.down.reset()
        await settle()
        assert c.up.closing and not c.up.lost  # still flushing "partial"
        assert c.closed == []
        assert c.up.read() == b"partial" and c.up.peer_got_eof
        await settle()
        assert [s.reason for s in c.closed] == [END_RESET]

    run(scenario)


def test_a_connection_closed_without_eof_ends_the_pipe():
    """A connection lost without an error and without an EOF read first (closed by a write
    error path, by someone else): the pipe ends with reason closed."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.up.closing = True
        c.up._lose(None)
        await settle()
        assert c.down.lost
        assert [s.reason for s in c.closed] == [END_CLOSED]

    run(scenario)


def test_on_closed_runs_exactly_once_whatever_follows():
    """The open-connections gauge is counted down in on_closed: after the end, late events
    (a second loss, EOF, data, close()/abort() by the owner) never call it again, and nothing
    is written to a closed transport."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.down.feed_eof()
        c.up.feed_eof()
        await settle()
        assert len(c.closed) == 1
        pipe_side = c.down.protocol
        pipe_side.data_received(b"late")  # type: ignore[attr-defined]
        pipe_side.eof_received()  # type: ignore[attr-defined]
        pipe_side.connection_lost(None)  # type: ignore[attr-defined]
        c.pipe.close()
        c.pipe.abort()
        await settle()
        assert len(c.closed) == 1

    run(scenario)


def test_a_failing_on_closed_callback_does_not_block_waiters():
    """An exception in the owner's callback is logged; wait_closed() still returns."""

    async def scenario(loop: ClockLoop) -> None:
        down, up = MemoryTransport(loop), MemoryTransport(loop)

        def broken(stats: PipeStats) -> None:
            raise ValueError("owner bug")

        pipe = BytePipe(PipeEnd(down), PipeEnd(up), PipeSettings(idle_timeout=0), broken)
        pipe.start()
        waiter = loop.create_task(pipe.wait_closed())
        await settle()
        down.reset()
        await settle()
        assert waiter.done() and waiter.result().reason == END_RESET

    run(scenario)


def test_owner_close_flushes_and_owner_abort_drops():
    """close() by the owner (a reload or shutdown policy) ends the pipe after flushing;
    abort() drops what is buffered and frees both sockets at once."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.down.feed(b"keep")
        c.pipe.close()
        assert c.pipe.ended and c.up.closing and not c.up.lost
        assert c.up.read() == b"keep"
        await settle()
        assert c.closed[0].reason == END_OWNER

        d = Conversation(loop).start()
        d.down.feed(b"drop")
        d.pipe.abort()
        await settle()
        assert d.up.aborted and d.down.aborted and d.up.received == b""
        assert d.closed[0].reason == END_ABORTED

    run(scenario)


# ---------------------------------------------------------------- flow control


def test_a_full_write_buffer_pauses_reading_the_other_side():
    """asyncio's flow control contract (pause_writing above the high-water mark,
    resume_writing at the low one): while the server does not read, the pipe stops reading
    the client, so it never holds more than one high-water mark plus one read."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()  # high 64, low 16 bytes
        c.down.feed(b"a" * 50)
        assert c.down.reading
        c.down.feed(b"b" * 50)  # 100 > 64 buffered toward the server
        assert not c.down.reading
        c.down.feed(b"c" * 1000)  # waits in the client's kernel buffer, not in the proxy
        assert c.up.get_write_buffer_size() == 100
        c.up.read(60)  # 40 left: above the low mark, still paused
        assert not c.down.reading
        c.up.read(30)  # 10 left: resume_writing, reading resumes, the 1000 bytes come in
        assert c.up.get_write_buffer_size() == 1010 and not c.down.reading
        assert bytes(c.up.received) + c.up.read() == b"a" * 50 + b"b" * 50 + b"c" * 1000
        assert c.down.reading

    run(scenario)


def test_flow_control_works_the_other_way_too():
    """The same from the server to a client that does not read."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.up.feed(b"x" * 100)
        assert not c.up.reading and c.down.reading
        c.down.read()
        assert c.up.reading

    run(scenario)


def test_a_hand_over_with_writing_paused_starts_paused():
    """PipeEnd.writing_paused: the caller's protocol had got pause_writing for the client's
    transport; the pipe does not read the server until resume_writing arrives."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop)
        c.down.write(b"z" * 100)  # the 101 response and more, unread by the client
        c.start()
        assert not c.up.reading  # guessed from the buffer over its high-water mark
        c.down.read()
        assert c.up.reading

        d = Conversation(loop, down={"writing_paused": True})
        d.down.protocol_paused = True
        d.down.buffer += b"y" * 40  # between the marks: only the caller knows it is paused
        d.start()
        assert not d.up.reading
        d.down.read()
        assert d.up.reading

    run(scenario)


def test_reading_is_never_resumed_after_eof():
    """After a side's EOF the pipe never calls resume_reading on it (a socket transport would
    read the EOF again), even when the other side's buffer pauses and resumes."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop).start()
        c.down.feed_eof()
        c.up.feed(b"q" * 100)  # the client's buffer goes over, then drains
        c.down.read()
        c.up.feed(b"q" * 100)
        c.down.read()
        assert c.down.reading_calls[1:] == []  # only start()'s resume before the EOF

        # The caller read the client's EOF before the hand-over, and the server's buffer is
        # over its mark: start() must not pause-then-resume the client (asyncio would add
        # the socket's reader back and read the EOF again).
        d = Conversation(loop, down={"eof": True})
        d.down.eof_delivered = True
        d.up.write(b"r" * 100)
        d.start()
        d.up.read()
        assert d.down.reading_calls == []
        assert d.up.peer_got_eof

    run(scenario)


# ---------------------------------------------------------------- timeouts


def test_idle_timeout_closes_both_sides():
    """No byte read from either side for idle_timeout seconds closes both connections
    (Envoy's tcp_proxy idle_timeout; Traefik sets none on TCP routes), reason idle timeout;
    any byte read restarts the count."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, PipeSettings(idle_timeout=60)).start()
        await advance(loop, 50)
        c.up.feed(b"keepalive")  # from either side
        assert c.down.read() == b"keepalive"
        await advance(loop, 50)
        assert not c.pipe.ended  # 50 s since the last byte
        c.down.feed(b"ping")
        assert c.up.read() == b"ping"
        await advance(loop, 59)
        assert not c.pipe.ended
        await advance(loop, 1)
        assert c.pipe.ended and c.down.lost and c.up.lost
        assert c.closed[0].reason == END_IDLE and c.closed[0].duration == 160

    run(scenario)


def test_idle_timeout_zero_means_none():
    """idle_timeout 0 keeps an idle pipe open indefinitely (Traefik's behaviour)."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, PipeSettings(idle_timeout=0)).start()
        await advance(loop, 10 * 24 * 3600)
        assert not c.pipe.ended and c.closed == []

    run(scenario)


def test_idle_timeout_applies_during_half_close():
    """A half-closed pipe whose open direction goes quiet is closed by the idle timeout too."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, PipeSettings(idle_timeout=30)).start()
        c.down.feed_eof()
        await advance(loop, 30)
        assert c.closed[0].reason == END_IDLE

    run(scenario)


def test_drain_timeout_aborts_a_peer_that_stops_reading():
    """After the end, a connection whose unsent bytes make no progress for drain_timeout
    seconds is aborted: a peer that never reads cannot hold the socket; one that reads slowly
    keeps it as long as it makes progress."""

    async def scenario(loop: ClockLoop) -> None:
        c = Conversation(loop, PipeSettings(idle_timeout=0, drain_timeout=10)).start()
        c.down.feed(b"w" * 50)  # buffered toward a server that does not read
        c.down.feed_eof()
        c.up.feed_eof()
        await settle()
        assert c.down.lost and not c.up.lost and c.closed == []
        c.up.read(10)  # slow progress within the first period: kept
        await advance(loop, 10)
        assert not c.up.lost
        await advance(loop, 10)  # no progress in the second period: aborted
        assert c.up.aborted and c.up.lost
        assert [s.reason for s in c.closed] == [END_EOF]

    run(scenario)


def test_settings_refuse_negative_timeouts():
    """Timeouts are seconds >= 0 (0 = none)."""
    with pytest.raises(ValueError):
        PipeSettings(idle_timeout=-1)
    with pytest.raises(ValueError):
        PipeSettings(drain_timeout=-0.5)


def test_tcp_routes_take_the_entrypoint_idle_timeout_only_when_set():
    """TCP routes: `transport.respondingTimeouts.idleTimeout` when the static config sets it
    (0 = none, Traefik's behaviour), else 1 h (Envoy's tcp_proxy default), never the 180 s
    HTTP keep-alive default Traefik gives that key."""
    from meshproxy.config.durations import Duration
    from meshproxy.config.static import EntryPoint, EntryPointTransport, RespondingTimeouts
    from meshproxy.tcp.proxy import pipe_settings

    def entry(idle: float | None) -> EntryPoint:
        timeouts = RespondingTimeouts(idle_timeout=None if idle is None else Duration(idle))
        return EntryPoint(
            address=":10000", transport=EntryPointTransport(responding_timeouts=timeouts)
        )

    assert pipe_settings(EntryPoint(address=":10000")).idle_timeout == 3600.0
    assert pipe_settings(entry(None)).idle_timeout == 3600.0
    assert pipe_settings(entry(0)).idle_timeout == 0
    assert pipe_settings(entry(30)).idle_timeout == 30
