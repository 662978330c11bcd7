"""HTTP/1.1 proxying through a real proxy process to real backends."""

from __future__ import annotations

import asyncio
from collections import Counter

import h11

from tests.helpers import (
    catch_all,
    lb,
    raw_exchange,
    read_request_head,
    read_response,
    request,
    router,
    start_raw_backend,
)


async def test_host_and_path_prefix_rules_route_to_the_right_service(backends, proxy_factory):
    api, web = await backends("api"), await backends("web")
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {
                    "api": router("Host(`shop.test`) && PathPrefix(`/api`)", "api"),
                    "web": router("Host(`shop.test`)", "web"),
                },
                "services": {"api": lb(api.url), "web": lb(web.url)},
            }
        }
    )
    first = await request(proxy.port, target="/api/items", host="shop.test")
    second = await request(proxy.port, target="/index.html", host="shop.test")
    assert first.body.startswith(b"Hostname: api")
    assert second.body.startswith(b"Hostname: web")
    assert (await request(proxy.port, host="other.test")).status == 404


async def test_weighted_servers_get_requests_in_proportion(backends, proxy_factory):
    a, b = await backends("a"), await backends("b")
    servers = [{"url": a.url, "weight": 3}, {"url": b.url, "weight": 1}]
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {"r": router("PathPrefix(`/`)", "s")},
                "services": {"s": {"loadBalancer": {"servers": servers}}},
            }
        }
    )
    names = Counter()
    for _ in range(40):
        response = await request(proxy.port)
        names[response.body.split(b"\n")[0]] += 1
    assert names == {b"Hostname: a": 30, b"Hostname: b": 10}


async def test_weighted_service_splits_traffic_between_services(backends, proxy_factory):
    v1, v2 = await backends("v1"), await backends("v2")
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {"r": router("Host(`app.test`)", "split")},
                "services": {
                    "split": {
                        "weighted": {
                            "services": [{"name": "v1", "weight": 80}, {"name": "v2", "weight": 20}]
                        }
                    },
                    "v1": lb(v1.url),
                    "v2": lb(v2.url),
                },
            }
        }
    )
    for _ in range(50):
        assert (await request(proxy.port, host="app.test")).status == 200
    assert (len(v1.requests), len(v2.requests)) == (40, 10)


async def test_keep_alive_client_reuses_one_pooled_upstream_connection(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    conn = h11.Connection(h11.CLIENT)
    for _ in range(20):
        writer.write(conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")])))
        writer.write(conn.send(h11.EndOfMessage()))
        response = await read_response(conn, reader)
        assert response.status == 200
        conn.start_next_cycle()
    writer.close()
    for _ in range(5):  # new client connections reuse the pooled upstream connection too
        assert (await request(proxy.port)).status == 200
    assert backend.connections == 1
    assert len(backend.requests) == 25


async def test_request_and_response_bodies_stream_in_both_framings(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    payload = bytes(range(256)) * 4096  # 1 MiB
    response = await request(proxy.port, "POST", "/echo", body=payload)
    assert response.status == 200 and response.body == payload
    chunked = await request(
        proxy.port, "POST", "/echo", headers={"Transfer-Encoding": "chunked"}, body=payload
    )
    assert chunked.status == 200 and chunked.body == payload
    assert backend.requests[-1]["body"] == payload
    assert ("transfer-encoding", "chunked") in backend.requests[-1]["headers"]


async def test_chunked_and_close_delimited_responses_reach_the_client_intact(proxy_factory):
    async def handler(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if b"/chunked" not in head:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close body")
                writer.close()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await writer.drain()

    server, port = await start_raw_backend(handler)
    proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
    chunked = await request(proxy.port, target="/chunked")
    assert chunked.body == b"hello world"
    assert chunked.headers.get("transfer-encoding") == "chunked"
    close_delimited = await request(proxy.port, target="/eof")
    assert close_delimited.body == b"until-close body"
    server.close()


async def test_expect_100_continue_gets_interim_response_before_body(backends, proxy_factory):
    """RFC 9110 §10.1.1: Expect is forwarded; this backend never sends 100 itself, so the
    proxy sends one after its short expect-continue delay and the upload goes through."""
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "5")])
    )
    conn.send(h11.Data(data=b"hello"))
    conn.send(h11.EndOfMessage())
    response = await read_response(conn, reader)
    assert response.status == 200 and response.body == b"hello"
    assert any(name == "expect" for name, _ in backend.requests[0]["headers"])
    writer.close()


async def test_head_and_204_304_responses_carry_no_body(proxy_factory):
    async def handler(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            elif b"/204" in head:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
            await writer.drain()

    server, port = await start_raw_backend(handler)
    proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    conn = h11.Connection(h11.CLIENT)
    for method, target, status in (("HEAD", "/", 200), ("GET", "/204", 204), ("GET", "/304", 304)):
        writer.write(conn.send(h11.Request(method=method, target=target, headers=[("Host", "x")])))
        writer.write(conn.send(h11.EndOfMessage()))
        response = await read_response(conn, reader)
        assert (response.status, response.body) == (status, b"")
        if method == "HEAD":
            assert response.headers["content-length"] == "1000"
        conn.start_next_cycle()  # the same connection still works: framing stayed right
    writer.close()
    server.close()


async def test_hop_by_hop_headers_removed_and_forwarded_headers_set(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    await request(
        proxy.port,
        headers={
            "Host": "svc.test:8443",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic x",
            "X-Forwarded-For": "6.6.6.6",
            "X-Real-Ip": "6.6.6.6",
            "X-Kept": "yes",
        },
    )
    headers = dict(backend.requests[0]["headers"])
    for hop in ("connection", "x-secret-hop", "keep-alive", "proxy-authorization"):
        assert hop not in headers
    assert headers["x-kept"] == "yes"
    assert headers["host"] == "svc.test:8443"
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the untrusted client's value was dropped
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "svc.test:8443"
    assert headers["x-forwarded-port"] == "8443"


async def test_forwarded_headers_from_trusted_ips_are_kept(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(
        catch_all(backend.url),
        extra_flags=["--entryPoints.web.forwardedHeaders.trustedIPs=127.0.0.0/8"],
    )
    await request(proxy.port, headers={"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "https"})
    headers = dict(backend.requests[0]["headers"])
    assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"


async def test_pass_host_header_false_sends_the_server_host(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url, passHostHeader=False))
    await request(proxy.port, host="public.test")
    assert dict(backend.requests[0]["headers"])["host"] == f"127.0.0.1:{backend.port}"


async def test_error_statuses_match_traefik(proxy_factory):
    async def silent(reader, writer):
        await reader.read()  # never answers

    server, silent_port = await start_raw_backend(silent)
    refused = f"http://127.0.0.1:{server.sockets[0].getsockname()[1] + 0}"
    closed_port_probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = closed_port_probe.sockets[0].getsockname()[1]
    closed_port_probe.close()
    await closed_port_probe.wait_closed()
    del refused
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {
                    "empty": router("Path(`/empty`)", "empty"),
                    "dead": router("Path(`/dead`)", "dead"),
                    "slow": router("Path(`/slow`)", "slow"),
                },
                "services": {
                    "empty": {"loadBalancer": {"servers": []}},
                    "dead": lb(f"http://127.0.0.1:{dead_port}"),
                    "slow": lb(f"http://127.0.0.1:{silent_port}", serversTransport="quick"),
                },
                "serversTransports": {
                    "quick": {"forwardingTimeouts": {"responseHeaderTimeout": "300ms"}}
                },
            }
        }
    )
    empty = await request(proxy.port, target="/empty")
    assert (empty.status, empty.body) == (503, b"no available server\n")
    assert (await request(proxy.port, target="/dead")).status == 502
    assert (await request(proxy.port, target="/slow")).status == 504
    assert (await request(proxy.port, target="/nothing")).body == b"404 page not found\n"
    server.close()


async def test_backend_reset_mid_response_ends_only_that_exchange(backends, proxy_factory):
    async def resetting(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    server, port = await start_raw_backend(resetting)
    healthy = await backends("healthy")
    proxy = await proxy_factory(
        {
            "http": {
                "routers": {
                    "bad": router("Path(`/bad`)", "bad"),
                    "good": router("Path(`/good`)", "good"),
                },
                "services": {"bad": lb(f"http://127.0.0.1:{port}"), "good": lb(healthy.url)},
            }
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n")
    received = await asyncio.wait_for(reader.read(-1), 5)  # the proxy closes this connection
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"partial")
    writer.close()
    assert (await request(proxy.port, target="/good")).status == 200
    server.close()


async def test_slow_client_pauses_the_backend_instead_of_buffering(proxy_factory):
    paused = asyncio.Event()

    class Big(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
            self.transport.write(b"x" * (8 << 20))

        def pause_writing(self):
            paused.set()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Big, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1024)
    writer.transport.pause_reading()  # a client that does not read
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(paused.wait(), 10)  # the proxy stopped reading from the backend
    writer.close()
    server.close()


async def test_pipelined_requests_are_answered_in_order(backends, proxy_factory):
    backend = await backends()
    proxy = await proxy_factory(catch_all(backend.url))
    data = b"".join(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
    data += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    received = await raw_exchange(proxy.port, data)
    assert received.count(b"HTTP/1.1 200 OK") == 6
    order = [received.index(b"GET /n%d " % i) for i in range(5)] + [received.index(b"GET /last ")]
    assert order == sorted(order)


async def test_response_hop_by_hop_headers_are_dropped_before_the_client(proxy_factory):
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 Fine By Me\r\nConnection: keep-alive, X-Node-Secret\r\n"
            b"X-Node-Secret: 42\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
        await writer.drain()

    server, port = await start_raw_backend(backend)
    async with server:
        proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
        response = await request(proxy.port)
    headers = dict(response.headers)
    assert response.status == 200 and response.body == b"ok"
    assert headers["x-kept"] == "yes"
    for hop in ("x-node-secret", "keep-alive"):
        assert hop not in headers
    assert response.reason == "OK"  # as Traefik: the phrase comes from the status code


async def test_request_fields_reach_the_backend_as_sent_whether_or_not_they_need_rewriting(
    proxy_factory,
):
    """A clean head is forwarded line for line (case and order kept, X-Forwarded-* added); a
    head with a hop-by-hop field, the next one pipelined behind it, or one split over two
    writes, gets the same fields through the rebuilt path."""
    heads: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                heads.append(await read_request_head(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    server, port = await start_raw_backend(backend)
    async with server:
        proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
        clean = b"GET /a?q=1 HTTP/1.1\r\nHost: svc.test\r\nUser-Agent: t/1\r\nX-Mixed-Case: v  \r\n"
        hop = b"GET /b HTTP/1.1\r\nHost: svc.test\r\nTE: trailers\r\nX-Mixed-Case: v\r\n"
        last = b"GET /c HTTP/1.1\r\nHost: svc.test\r\nX-Mixed-Case: v\r\nConnection: close\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(clean + b"\r\n")
        await reader.readuntil(b"ok")
        writer.write(hop + b"\r\n" + last[:20])  # the last head arrives in two writes
        await writer.drain()
        await reader.readuntil(b"ok")
        writer.write(last[20:] + b"\r\n")
        received = await reader.read(-1)
        writer.close()
    assert received.count(b"HTTP/1.1 200 OK") == 1
    assert len(heads) == 3
    assert heads[0].startswith(clean)
    forwarded = heads[0][len(clean) :]
    for line in (
        b"x-forwarded-proto: http\r\n",
        b"x-forwarded-host: svc.test\r\n",
        b"x-forwarded-port: 80\r\n",  # Host has no port: the scheme default, as Traefik
        b"x-real-ip: 127.0.0.1\r\n",
        b"x-forwarded-for: 127.0.0.1\r\n",
    ):
        assert line in forwarded
    for head in heads[1:]:
        lines = head.lower().split(b"\r\n")
        assert b"x-mixed-case: v" in lines and b"host: svc.test" in lines
        assert b"x-forwarded-for: 127.0.0.1" in lines
        assert not any(line.startswith(b"connection:") for line in lines)
        # TE is hop-by-hop: the client's is not forwarded, but the proxy, which carries
        # trailers, asks this hop for them in its own right (RFC 9110 §10.1.4)
        assert [line for line in lines if line.startswith(b"te:")] in ([], [b"te: trailers"])


async def test_response_head_split_over_reads_and_after_an_interim_1xx_reaches_the_client(
    proxy_factory,
):
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nX-Fi")
        await writer.drain()
        await asyncio.sleep(0)  # the rest of the head comes in a later write
        writer.write(b"rst: 1\r\nX-Second: 2\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        await reader.read()

    server, port = await start_raw_backend(backend)
    async with server:
        proxy = await proxy_factory(catch_all(f"http://127.0.0.1:{port}"))
        response = await request(proxy.port)
    headers = dict(response.headers)
    assert response.status == 200 and response.body == b"hello"
    assert headers["x-first"] == "1" and headers["x-second"] == "2"
    assert "link" not in headers  # the interim response's fields are not the final one's
