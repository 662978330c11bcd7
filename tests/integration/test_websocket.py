"""WebSocket over HTTP/1.1 through a real proxy process, with the `websockets` package as both
the client and the backend (RFC 6455; RFC 9110 §7.8 for the upgrade)."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.helpers import catch_all, lb, router, wait_for
from tests.integration.test_http_hardening import metric


@pytest.fixture
async def ws_backend():
    """An echo backend; a text message "close:<code>" makes it close with that code."""
    seen: dict[str, object] = {}

    async def handler(ws: ServerConnection) -> None:
        seen["headers"] = ws.request.headers if ws.request else None
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close:"):
                    await ws.close(int(message[6:]), "bye")
                    return
                await ws.send(message)
        except ConnectionClosed as closed:
            seen["client_close"] = closed.rcvd.code if closed.rcvd else None
        else:
            seen["client_close"] = ws.close_code

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}", seen


async def test_echo_text_binary_large_and_fragmented(ws_backend, proxy_factory):
    """RFC 6455 §5: text, binary, a 1 MiB message and a fragmented one arrive intact both
    ways; ping/pong works (§5.5.2); the handshake passed the backend's key check."""
    url, seen = ws_backend
    proxy = await proxy_factory(catch_all(url))
    async with connect(f"ws://127.0.0.1:{proxy.port}/chat", max_size=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        big = bytes(range(256)) * 4096  # 1 MiB
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send(["frag", "mented ", "message"])  # one message in three frames
        assert await ws.recv() == "fragmented message"
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 10)
    headers = seen["headers"]
    assert headers is not None and headers["X-Forwarded-For"] == "127.0.0.1"
    text = proxy.metrics()
    assert metric(text, "traefik_entrypoint_requests_total", protocol="websocket", code="101") == 1
    await wait_for(
        lambda: metric(proxy.metrics(), "traefik_open_connections", entrypoint="web") == 0,
        10,
        "the tunnel's connections closed",
    )


async def test_close_codes_propagate_both_ways(ws_backend, proxy_factory):
    """RFC 6455 §7.1.5: the close code one side sends is the one the other side receives."""
    url, seen = ws_backend
    proxy = await proxy_factory(catch_all(url))
    async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        await ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        await ws.send("x")
        await ws.recv()
        await ws.close(4002, "client leaves")
    await wait_for(lambda: seen.get("client_close") == 4002, 10, "the backend got 4002")


async def test_websocket_stays_up_across_a_reload_that_removes_its_router(
    ws_backend, proxy_factory
):
    """traefik/traefik#6235: a reload, even one removing the WebSocket's router, does not cut
    an established WebSocket; new upgrades follow the new config."""
    url, _ = ws_backend
    config = {
        "http": {"routers": {"ws": router("PathPrefix(`/ws`)", "s")}, "services": {"s": lb(url)}}
    }
    proxy = await proxy_factory(config)
    async with connect(f"ws://127.0.0.1:{proxy.port}/ws") as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        generation = proxy.generation()
        proxy.write({"http": {"routers": {}, "services": {}}})
        await wait_for(lambda: proxy.generation() > generation, 10, "reload")
        await ws.send("after")
        assert await ws.recv() == "after"
    with pytest.raises(Exception, match="404"):
        async with connect(f"ws://127.0.0.1:{proxy.port}/ws"):
            pass


async def test_middlewares_run_on_the_handshake(ws_backend, proxy_factory):
    """The upgrade request is an ordinary exchange for the chain: an ipAllowList that
    refuses the client answers 403 and no tunnel opens."""
    url, _ = ws_backend
    config = catch_all(url)
    config["http"]["routers"]["r"]["middlewares"] = ["deny"]
    config["http"]["middlewares"] = {"deny": {"ipAllowList": {"sourceRange": ["192.0.2.0/24"]}}}
    proxy = await proxy_factory(config)
    with pytest.raises(Exception, match="403"):
        async with connect(f"ws://127.0.0.1:{proxy.port}/"):
            pass


async def test_backend_with_a_wrong_accept_key_gets_502(proxy_factory):
    """RFC 6455 §4.1: a client must fail a handshake whose Sec-WebSocket-Accept does not
    answer its key; the proxy answers 502 instead of tunnelling it, and closes the backend
    connection."""
    closed = asyncio.Event()

    async def bad_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
        )
        if await reader.read() == b"":
            closed.set()
        writer.close()

    server = await asyncio.start_server(bad_backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
    with pytest.raises(Exception, match="502"):
        async with connect(f"ws://127.0.0.1:{proxy.port}/"):
            pass
    await asyncio.wait_for(closed.wait(), 10)
    server.close()


async def test_shutdown_closes_websockets_with_1001_on_both_sides(ws_backend, proxy_factory):
    """RFC 6455 §7.4.1: on SIGTERM the proxy says "going away" (1001) to the client and to
    the backend, instead of cutting TCP under them."""
    url, seen = ws_backend
    proxy = await proxy_factory(catch_all(url))
    async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        proxy.process.terminate()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    await wait_for(lambda: seen.get("client_close") == 1001, 10, "the backend got 1001")


async def test_idle_websocket_is_closed_after_the_tunnel_idle_timeout(ws_backend, proxy_factory):
    """A WebSocket with no byte either way for `respondingTimeouts.tunnelIdleTimeout` (a
    meshproxy option, 1 h by default) is closed, and its connections are counted down."""
    url, _ = ws_backend
    proxy = await proxy_factory(
        catch_all(url),
        extra_flags=["--entryPoints.web.transport.respondingTimeouts.tunnelIdleTimeout=1s"],
    )
    async with connect(f"ws://127.0.0.1:{proxy.port}/", ping_interval=None) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 20)  # nothing sent: the proxy closes it
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # going away
    await wait_for(
        lambda: metric(proxy.metrics(), "traefik_open_connections", entrypoint="web") == 0,
        10,
        "the tunnel's connections closed",
    )
