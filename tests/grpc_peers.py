"""Real gRPC peers for the tests: a grpcio server with a generic `test.Echo` service (bytes in,
bytes out: no protoc needed) plus the standard health service, and grpcio client helpers.

The server's behaviour is steered per call by request metadata, so one server serves every
test:

    x-status: N, x-message-bin: UTF-8 TEXT
                                   end the call with status N and that message
    x-delay: SECONDS               wait that long first (ends early if the call is cancelled)
    x-echo-metadata: 1             send the call's metadata back, as initial metadata and as
                                   trailing metadata with keys prefixed `t-` (binary `-bin`
                                   keys included)

Methods: Unary (echo), ServerStream (request `count:size` -> `count` messages of `size`
bytes), ClientStream (-> the total size and the messages' count, `size:count`), Bidi (echo
each message as it comes). Every call is recorded (`calls`): method, metadata, the deadline
time left it saw, whether it ended cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "test.Echo"
BIG = 16 * 1024 * 1024  # message size limit on both sides: 4 MiB messages must pass
OPTIONS = [
    ("grpc.max_send_message_length", BIG),
    ("grpc.max_receive_message_length", BIG),
]
# Metadata the transport sets or reads: never echoed back (grpcio refuses to send some).
_RESERVED = ("grpc-", ":", "user-agent", "content-type", "te", "x-echo-", "x-status", "x-message")


STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Call:
    """One call as the server saw it. `cancelled` is set when the call ended before its
    handler finished (the client cancelled, or its deadline passed): grpcio runs the
    termination callback then, and stops iterating a streaming handler without telling it."""

    def __init__(self, method: str, metadata: list[tuple[str, Any]], remaining: float | None):
        self.method = method
        self.metadata = metadata
        self.time_remaining = remaining
        self.finished = False  # the handler returned or aborted on its own
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def ended(self) -> None:
        if not self.finished:
            self.cancelled.set()
        self.done.set()


class EchoServer:
    """A grpcio server on 127.0.0.1 (plaintext HTTP/2, i.e. h2c) with `test.Echo` and
    `grpc.health.v1.Health`."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=OPTIONS)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"h2c://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)

    def set_serving(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(service, status)

    # -- handlers -----------------------------------------------------------------------

    def _begin(self, method: str, context: grpc.ServicerContext) -> tuple[Call, dict[str, Any]]:
        metadata = list(context.invocation_metadata())
        call = Call(method, metadata, context.time_remaining())
        self.calls.append(call)
        context.add_callback(call.ended)
        meta = dict(metadata)
        delay = float(meta.get("x-delay", 0))
        if delay:
            # wait for the delay, or for the end of the call (a cancellation ends it)
            call.done.wait(delay)
        if not context.is_active():
            return call, meta
        if meta.get("x-echo-metadata"):
            echoed = tuple((k, v) for k, v in metadata if not k.startswith(_RESERVED))
            context.send_initial_metadata(echoed)
            context.set_trailing_metadata(tuple(("t-" + k, v) for k, v in echoed))
        if "x-status" in meta:
            message = meta.get("x-message-bin", b"").decode("utf-8")
            call.finished = True
            context.abort(STATUS_CODES[int(meta["x-status"])], message)
        return call, meta

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        call, _ = self._begin("Unary", context)
        call.finished = True
        return request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call, _ = self._begin("ServerStream", context)
        count, size = (int(x) for x in request.split(b":"))
        for index in range(count):
            yield bytes([index % 256]) * size
        call.finished = True

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        call, _ = self._begin("ClientStream", context)
        total = count = 0
        for message in requests:
            total += len(message)
            count += 1
        call.finished = True
        return b"%d:%d" % (total, count)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        call, _ = self._begin("Bidi", context)
        yield from requests
        call.finished = True

    def wait_cancelled(self, timeout: float = 10.0) -> Call | None:
        """The first recorded call that ended cancelled, waiting up to `timeout` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for call in self.calls:
                if call.cancelled.is_set():
                    return call
            time.sleep(0.01)
        return None


class EchoClient:
    """A stock grpcio client for `test.Echo` on `address` (host:port, plaintext)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        prefix = f"/{SERVICE}/"
        self.unary = self.channel.unary_unary(prefix + "Unary")
        self.server_stream = self.channel.unary_stream(prefix + "ServerStream")
        self.client_stream = self.channel.stream_unary(prefix + "ClientStream")
        self.bidi = self.channel.stream_stream(prefix + "Bidi")
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EchoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BreakingBackend:
    """An h2c backend written with the `h2` library that starts every response as a gRPC
    server would (:status 200, application/grpc, one message) and then breaks it: `mode`
    "reset" resets the stream (RST_STREAM INTERNAL_ERROR), "close" drops the connection. For
    what a proxy must do when a stream dies after its response started (issue 11).

    `mode` "hold" never answers and ignores grpc-timeout (unlike a gRPC server, which would
    enforce it): only the proxy can end such a call. `ended` counts the held streams the
    proxy ended (RST_STREAM, or the connection closed)."""

    def __init__(self, mode: str = "reset") -> None:
        self.mode = mode
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.broken = 0
        self.held = 0
        self.ended = 0

    async def start(self) -> BreakingBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"h2c://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        held = 0  # streams of this connection held open
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamReset):
                        self.ended += 1
                        held -= 1
                    if isinstance(event, h2.events.RequestReceived) and self.mode == "hold":
                        self.held += 1
                        held += 1
                    elif isinstance(event, h2.events.RequestReceived):
                        stream = event.stream_id
                        conn.send_headers(
                            stream, [(":status", "200"), ("content-type", "application/grpc")]
                        )
                        conn.send_data(stream, b"\x00\x00\x00\x00\x03abc")
                        writer.write(conn.data_to_send())
                        await writer.drain()
                        self.broken += 1
                        if self.mode == "close":
                            writer.transport.abort()
                            return
                        conn.reset_stream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.ended += max(held, 0)  # the connection's end ends its held streams
            writer.close()
