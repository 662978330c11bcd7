"""TCP routers on a real proxy process: relaying, round robin, weighted, ipAllowList."""

from __future__ import annotations

import asyncio

from meshproxy.demo.echo import serve_tcp_echo
from tests.helpers import free_port


async def tagged_echo(tag: bytes) -> tuple[asyncio.AbstractServer, int]:
    """An echo server that prefixes what it sends back with its tag."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(tag + data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
    except OSError:  # the proxy already closed the connection (refused source)
        pass
    try:
        data = await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionResetError:  # closed with our bytes unread: the kernel sends a reset
        data = b""
    writer.close()
    return data


async def test_tcp_router_relays_both_ways_and_balances_connections(proxy_factory):
    a, port_a = await tagged_echo(b"a:")
    b, port_b = await tagged_echo(b"b:")
    tcp_port = free_port()
    config = {
        "tcp": {
            "routers": {
                "echo": {"entryPoints": ["tcp"], "rule": "HostSNI(`*`)", "service": "echo"}
            },
            "services": {
                "echo": {
                    "loadBalancer": {
                        "servers": [
                            {"address": f"127.0.0.1:{port_a}"},
                            {"address": f"127.0.0.1:{port_b}"},
                        ]
                    }
                }
            },
        }
    }
    proxy = await proxy_factory(
        config, entrypoints={"web": f"127.0.0.1:{free_port()}", "tcp": f"127.0.0.1:{tcp_port}"}
    )
    replies = sorted([await exchange(tcp_port, b"hello") for _ in range(4)])
    assert replies == [b"a:hello", b"a:hello", b"b:hello", b"b:hello"]
    big = bytes(range(256)) * 4096  # 1 MiB through the relay, flow control on both sides
    assert (await exchange(tcp_port, big)).replace(b"a:", b"").replace(b"b:", b"") == big
    assert proxy.rawdata()["tcpRouters"]["echo@file"]["status"] == "enabled"
    a.close()
    b.close()


async def test_tcp_ip_allow_list_closes_connections_from_other_sources(proxy_factory):
    echo = await serve_tcp_echo("127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    open_port, closed_port = free_port(), free_port()
    service = {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{echo_port}"}]}}
    config = {
        "tcp": {
            "routers": {
                "open": {
                    "entryPoints": ["open"],
                    "rule": "HostSNI(`*`)",
                    "service": "echo",
                    "middlewares": ["loopback"],
                },
                "closed": {
                    "entryPoints": ["closed"],
                    "rule": "HostSNI(`*`)",
                    "service": "echo",
                    "middlewares": ["pods-only"],
                },
            },
            "middlewares": {
                "loopback": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
                "pods-only": {"ipAllowList": {"sourceRange": ["10.0.0.0/8"]}},
            },
            "services": {"echo": service},
        }
    }
    await proxy_factory(
        config,
        entrypoints={
            "web": f"127.0.0.1:{free_port()}",
            "open": f"127.0.0.1:{open_port}",
            "closed": f"127.0.0.1:{closed_port}",
        },
    )
    assert await exchange(open_port, b"ping") == b"ping"
    assert await exchange(closed_port, b"ping") == b""  # closed without a byte relayed
    echo.close()
