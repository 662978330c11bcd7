"""Echo backends for the local mesh: TCP, UDP and WebSocket (each sends back what it gets)."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web


class _TCPEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class _UDPEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def serve_tcp_echo(host: str, port: int) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(_TCPEcho, host, port)


async def serve_udp_echo(host: str, port: int) -> asyncio.DatagramTransport:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _UDPEcho, local_addr=(host, port)
    )
    return transport


async def serve_websocket_echo(host: str, port: int) -> web.AppRunner:
    async def echo(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await socket.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await socket.send_bytes(message.data)
        return socket

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


GRPC_ECHO_METHOD = "/meshproxy.demo.Echo/Say"


async def serve_grpc_echo(host: str, port: int) -> object:
    """A gRPC server whose one method, /meshproxy.demo.Echo/Say, returns the request message.

    Messages stay raw bytes (no serializers), so no generated code is needed: any client can
    call it, e.g. `grpc.aio.insecure_channel(...).unary_unary(GRPC_ECHO_METHOD)(b"hi")`.
    """
    import grpc

    async def say(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "meshproxy.demo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
