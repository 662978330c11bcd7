"""UDP entrypoints on a real proxy process, real datagram sockets on loopback: request/response
services, session expiry, caps under a flood, dead servers, reloads, weighted services,
metrics, and Traefik Mesh's UDP fixture. Rules: reference/traefik-proxy.md §1.6 (UDP routers
have no rule; services loadBalancer | weighted; one router per entrypoint), §4.1 (UDP WRR; no
server -> session dropped), §5.3 (established sessions survive reloads), §5.4 (`:P/udp`,
`udp.timeout` 3 s, a session per client address, the server chosen once per session)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import FIXTURES, wait_for
from tests.unit.test_udp_sessions import Peer, backend, client


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def udp_config(*servers: tuple[str, int], entrypoint: str = "dns") -> dict[str, Any]:
    return {
        "udp": {
            "routers": {"dns": {"entryPoints": [entrypoint], "service": "dns"}},
            "services": {
                "dns": {"loadBalancer": {"servers": [{"address": f"{h}:{p}"} for h, p in servers]}}
            },
        }
    }


async def udp_proxy(proxy_factory, dynamic: dict[str, Any], *flags: str) -> Any:
    port = free_udp_port()
    return await proxy_factory(
        dynamic, entrypoints={"dns": f"127.0.0.1:{port}/udp"}, extra_flags=list(flags)
    )


def address(proxy: Any) -> tuple[str, int]:
    return ("127.0.0.1", proxy.port_of("dns"))


def metric(proxy: Any, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when the series is absent)."""
    wanted = {"entrypoint": "dns", **labels}
    for family in text_string_to_metric_families(proxy.metrics()):
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return sample.value
    return 0.0


def fds(proxy: Any) -> int:
    """The UDP sockets the proxy process holds: its fds' socket inodes that are in the UDP
    tables (so admin HTTP connections and the like do not count)."""
    pid = proxy.process.pid
    udp = set()
    for table in ("udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            udp.update(line.split()[9] for line in lines)
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:[") and link[8:-1] in udp:
            held += 1
    return held


class DNSLike(Peer):
    """A request/response server in the shape of DNS: a 2-byte id and a name in, the same id,
    the server's tag and the name out; id 0xFFFF asks for the request back unchanged."""

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sources[addr] += 1
        ident, name = data[:2], data[2:]
        answer = data if ident == b"\xff\xff" else ident + self.tag + b"|" + name
        self.transport.sendto(answer, addr)  # type: ignore[union-attr]


async def dns_server(tag: bytes) -> tuple[DNSLike, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: DNSLike(tag), local_addr=("127.0.0.1", 0)
    )
    return server, transport.get_extra_info("sockname")


async def test_request_response_service_answers_many_clients(proxy_factory):
    """§5.4: 50 clients x 10 queries with random ids: every answer reaches the client that
    asked, with its id and name; a client keeps its server for its session; sessions are
    spread round robin (25/25); then one client's burst of 100 is relayed whole and the
    largest IPv4 datagram (65,507 bytes) crosses both ways."""
    one, one_addr = await dns_server(b"ns1")
    two, two_addr = await dns_server(b"ns2")
    # a long timeout: no session may expire between rounds on a loaded machine
    proxy = await udp_proxy(
        proxy_factory, udp_config(one_addr, two_addr), "--entryPoints.dns.udp.timeout=60s"
    )
    clients = [await client(address(proxy)) for _ in range(50)]
    servers: dict[int, bytes] = {}
    rng = random.Random(12)
    for round_ in range(10):
        asked = []
        for i, peer in enumerate(clients):
            ident = struct.pack("!H", rng.randrange(65536))
            name = b"host-%d-%d.example" % (i, round_)
            asked.append((ident, name))
            peer.transport.sendto(ident + name)
        for i, peer in enumerate(clients):
            answer = await peer.recv()
            ident, name = asked[i]
            assert answer[:2] == ident
            tag, _, got_name = answer[2:].partition(b"|")
            assert got_name == name
            assert servers.setdefault(i, tag) == tag  # same server all session long
    assert Counter(servers.values()) == {b"ns1": 25, b"ns2": 25}
    assert len(one.sources) == len(two.sources) == 25  # a socket per session
    burst = clients[0]
    payloads = {b"%03d" % i + b"." * 97 for i in range(100)}
    for payload in sorted(payloads):
        burst.transport.sendto(b"\x00\x01" + payload)
    got = {(await burst.recv())[6:] for _ in range(100)}
    assert got == payloads
    big = b"\xff\xff" + bytes(range(256)) * 255 + b"z" * 225
    assert len(big) == 65507
    burst.transport.sendto(big)
    assert await burst.recv() == big
    assert metric(proxy, "meshproxy_udp_sessions_opened_total") == 50
    assert metric(proxy, "meshproxy_udp_datagrams_total", direction="from_client") == 601
    assert metric(proxy, "meshproxy_udp_datagrams_total", direction="from_server") == 601


async def test_sessions_end_after_the_udp_timeout(proxy_factory):
    """`entryPoints.X.udp.timeout` (Traefik's idle session lifetime): sessions with no
    datagram either way end, their sockets closed; the next datagram opens a new one."""
    _, addr = await backend(b"")
    proxy = await udp_proxy(proxy_factory, udp_config(addr), "--entryPoints.dns.udp.timeout=500ms")
    before = fds(proxy)
    peers = [await client(address(proxy)) for _ in range(10)]
    for peer in peers:
        peer.transport.sendto(b"hi")
        assert await peer.recv() == b"hi"
    assert metric(proxy, "meshproxy_udp_sessions") == 10
    assert fds(proxy) == before + 10
    await wait_for(lambda: metric(proxy, "meshproxy_udp_sessions") == 0, 10, "sessions to expire")
    assert metric(proxy, "meshproxy_udp_sessions_closed_total", reason="idle") == 10
    await wait_for(lambda: fds(proxy) == before, 5, "their sockets closed")
    peers[0].transport.sendto(b"back")
    assert await peers[0].recv() == b"back"
    assert metric(proxy, "meshproxy_udp_sessions_opened_total") == 11


async def test_a_flood_from_many_source_ports_stays_within_the_caps(proxy_factory):
    """Bad input (issue 12): 300 source ports on 5 loopback addresses, one datagram each:
    never more than `maxSessions` sessions (nor sockets), never more than
    `maxSessionsPerSource` per address; evictions counted by reason."""
    _, addr = await backend(b"")
    proxy = await udp_proxy(
        proxy_factory,
        udp_config(addr),
        "--entryPoints.dns.udp.timeout=60s",  # evictions only, no idle expiry
        "--entryPoints.dns.udp.maxSessions=50",
        "--entryPoints.dns.udp.maxSessionsPerSource=30",
    )
    before = fds(proxy)
    peers = [await client(address(proxy), f"127.0.0.{1 + i % 5}") for i in range(300)]
    for batch in range(0, 300, 20):  # 15 batches of 20 datagrams
        for peer in peers[batch : batch + 20]:
            peer.transport.sendto(b"flood")
        for peer in peers[batch : batch + 20]:
            await peer.recv()
        assert metric(proxy, "meshproxy_udp_sessions") <= 50
        assert fds(proxy) - before <= 50
    assert metric(proxy, "meshproxy_udp_sessions") == 50
    assert metric(proxy, "meshproxy_udp_sessions_opened_total") == 300
    evicted = metric(
        proxy, "meshproxy_udp_sessions_closed_total", reason="evicted_entrypoint"
    ) + metric(proxy, "meshproxy_udp_sessions_closed_total", reason="evicted_source")
    assert evicted == 250
    for peer in peers:
        peer.transport.close()


async def test_a_dead_server_ends_sessions_without_leaking_sockets(proxy_factory):
    """Traefik ends a session when the server socket fails: ICMP port unreachable from a
    closed port (ECONNREFUSED) ends it; 100 clients later the proxy holds no extra socket
    and no session, and the errors are counted."""
    proxy = await udp_proxy(proxy_factory, udp_config(("127.0.0.1", free_udp_port())))
    before = fds(proxy)
    peers = [await client(address(proxy)) for _ in range(100)]
    for peer in peers:
        peer.transport.sendto(b"anyone?")
    await wait_for(
        lambda: (
            metric(proxy, "meshproxy_udp_sessions_closed_total", reason="upstream_error") == 100
        ),
        10,
        "100 sessions ended by the refused server",
    )
    assert metric(proxy, "meshproxy_udp_sessions") == 0
    await wait_for(lambda: fds(proxy) == before, 5, "every server socket closed")
    assert all(peer.received.empty() for peer in peers)
    for peer in peers:
        peer.transport.close()


async def test_a_server_that_goes_away_mid_session_ends_its_sessions(proxy_factory):
    """The server closes its socket while 20 sessions are live: the clients' next datagrams
    meet ICMP port unreachable, every session ends (upstream_error) and its socket is closed;
    when a server is back on that port, a client's next datagram opens a new session."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Peer(b"", echo=True), local_addr=("127.0.0.1", 0)
    )
    addr = transport.get_extra_info("sockname")
    proxy = await udp_proxy(proxy_factory, udp_config(addr), "--entryPoints.dns.udp.timeout=60s")
    before = fds(proxy)
    peers = [await client(address(proxy)) for _ in range(20)]
    for peer in peers:
        peer.transport.sendto(b"up")
        assert await peer.recv() == b"up"
    assert fds(proxy) == before + 20
    transport.close()  # the server goes away (its socket is closed on the next loop turn)

    def port_free() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(addr)
            except OSError:
                return False
            return True

    await wait_for(port_free, 5, "the server's socket closed")
    for peer in peers:
        peer.transport.sendto(b"still there?")
    await wait_for(
        lambda: metric(proxy, "meshproxy_udp_sessions_closed_total", reason="upstream_error") == 20,
        10,
        "20 sessions ended by the vanished server",
    )
    assert metric(proxy, "meshproxy_udp_sessions") == 0
    await wait_for(lambda: fds(proxy) == before, 5, "their sockets closed")
    back, _ = await loop.create_datagram_endpoint(
        lambda: Peer(b"back:", echo=True), local_addr=addr
    )
    try:
        peers[0].transport.sendto(b"hello")
        assert await peers[0].recv() == b"back:hello"
    finally:
        back.close()
        for peer in peers:
            peer.transport.close()


async def test_reload_keeps_live_sessions_and_a_removed_router_ends_them(proxy_factory):
    """§5.3 (and issue 12 §6): after a reload that changes the service's servers, a live
    session keeps its server while a new client gets the new one; removing the router ends
    the live sessions; with no router the entrypoint stops relaying (drops counted)."""
    _, a_addr = await backend(b"a:")
    _, b_addr = await backend(b"b:")
    proxy = await udp_proxy(proxy_factory, udp_config(a_addr), "--entryPoints.dns.udp.timeout=30")
    old = await client(address(proxy))
    old.transport.sendto(b"1")
    assert await old.recv() == b"a:1"
    generation = proxy.generation()
    proxy.write(udp_config(b_addr))
    await wait_for(lambda: proxy.generation() > generation, 10, "the reload")
    new = await client(address(proxy))
    new.transport.sendto(b"2")
    assert await new.recv() == b"b:2"
    old.transport.sendto(b"3")
    assert await old.recv() == b"a:3"  # still on its first server
    generation = proxy.generation()
    proxy.write({"http": {}})  # every UDP router removed
    await wait_for(lambda: proxy.generation() > generation, 10, "the second reload")
    await wait_for(lambda: metric(proxy, "meshproxy_udp_sessions") == 0, 10, "sessions to end")
    assert metric(proxy, "meshproxy_udp_sessions_closed_total", reason="router_removed") == 2
    old.transport.sendto(b"4")
    await wait_for(
        lambda: metric(proxy, "meshproxy_udp_datagrams_dropped_total", reason="no_route") == 1,
        10,
        "the datagram dropped for want of a router",
    )
    assert old.received.empty()


async def test_weighted_udp_service_splits_sessions_by_weight(proxy_factory):
    """§1.6: a `weighted` UDP service, 3:1 over 40 new sessions: 30 and 10, each session
    staying with its pick."""
    _, a_addr = await backend(b"a:")
    _, b_addr = await backend(b"b:")
    dynamic = {
        "udp": {
            "routers": {"dns": {"entryPoints": ["dns"], "service": "split"}},
            "services": {
                "split": {"weighted": {"services": [{"name": "a", "weight": 3}, {"name": "b"}]}},
                "a": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*a_addr)}]}},
                "b": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*b_addr)}]}},
            },
        }
    }
    proxy = await udp_proxy(proxy_factory, dynamic)
    picks: Counter[bytes] = Counter()
    for _ in range(40):
        peer = await client(address(proxy))
        peer.transport.sendto(b"x")
        first = (await peer.recv())[:2]
        peer.transport.sendto(b"y")
        assert (await peer.recv())[:2] == first
        picks[first] += 1
        peer.transport.close()
    assert picks == {b"a:": 30, b"b:": 10}


async def test_one_udp_router_per_entrypoint_as_traefik(proxy_factory):
    """§1.7: UDP routers of an entrypoint are taken by qualified name, descending, and the
    first that builds serves it: `a@file` ('@' > '-') beats `a-b@file`, and a broken `z`
    (unknown service) is skipped. The others are shown with a warning in /api/rawdata."""
    _, a_addr = await backend(b"a:")
    _, b_addr = await backend(b"ab:")
    dynamic = {
        "udp": {
            "routers": {
                "a": {"entryPoints": ["dns"], "service": "a"},
                "a-b": {"entryPoints": ["dns"], "service": "ab"},
                "z": {"entryPoints": ["dns"], "service": "missing"},
            },
            "services": {
                "a": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*a_addr)}]}},
                "ab": {"loadBalancer": {"servers": [{"address": "{}:{}".format(*b_addr)}]}},
            },
        }
    }
    proxy = await udp_proxy(proxy_factory, dynamic)
    peer = await client(address(proxy))
    peer.transport.sendto(b"who")
    assert await peer.recv() == b"a:who"
    routers = proxy.rawdata()["udpRouters"]
    assert routers["a@file"]["status"] == "enabled"
    assert routers["a-b@file"]["status"] == "warning"
    assert routers["z@file"]["status"] == "disabled"


async def test_traefik_mesh_udp_fixture_relays_real_datagrams(proxy_factory):
    """Traefik Mesh's `annotations-traffic-type-config.json` as served (entrypoint
    udp-15000, two servers), with the server addresses pointed at local UDP echo servers:
    sessions alternate between them."""
    config = json.loads((FIXTURES / "annotations-traffic-type-config.json").read_text())
    _, a_addr = await backend(b"a:")
    _, b_addr = await backend(b"b:")
    services = config["udp"]["services"]
    for service in services.values():
        service["loadBalancer"]["servers"] = [
            {"address": "{}:{}".format(*a_addr)},
            {"address": "{}:{}".format(*b_addr)},
        ]
    port = free_udp_port()
    proxy = await proxy_factory(
        {"udp": config["udp"]}, entrypoints={"udp-15000": f"127.0.0.1:{port}/udp"}
    )
    tags = Counter()
    for _ in range(4):
        peer = await client(("127.0.0.1", port))
        peer.transport.sendto(b"mesh")
        reply = await peer.recv()
        assert reply[2:] == b"mesh"
        tags[reply[:2]] += 1
        peer.transport.close()
    assert tags == {b"a:": 2, b"b:": 2}
    assert proxy.rawdata()["udpRouters"]["my-ns-svc-b-8080@file"]["status"] == "enabled"


def test_a_udp_timeout_of_zero_refuses_to_start(tmp_path):
    """Traefik's UDP listener refuses a timeout <= 0: the proxy exits with one line naming
    the option."""
    (tmp_path / "none.yaml").write_text("{}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "proxy",
            f"--entryPoints.dns.address=127.0.0.1:{free_udp_port()}/udp",
            "--entryPoints.dns.udp.timeout=0",
            f"--providers.file.filename={tmp_path / 'none.yaml'}",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert b"entryPoints.dns.udp: udp.timeout must be greater than zero" in result.stderr


def test_check_accepts_traefik_mesh_udp_routers():
    """`meshproxy check` has no static config: the UDP entrypoints its UDP routers name are
    taken to exist, so Traefik Mesh's UDP fixture checks without a UDP error."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "check",
            str(FIXTURES / "annotations-traffic-type-config.json"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert b"udp." not in result.stdout, result.stdout


async def test_the_proxy_raises_its_open_file_limit_as_go_does(tmp_path):
    """Every UDP session holds a socket: the proxy raises its soft open-file limit to the hard
    one at start, as Go's runtime does for Traefik, whatever soft limit it was given."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit to raise to")
    (tmp_path / "empty.yaml").write_text("{}")

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "proxy",
            f"--entryPoints.dns.address=127.0.0.1:{free_udp_port()}/udp",
            f"--providers.file.filename={tmp_path / 'empty.yaml'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lower_soft_limit,
    )

    def soft_limit() -> str:
        for line in Path(f"/proc/{process.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
        return ""

    try:
        await wait_for(lambda: soft_limit() == str(hard), 15, "the raised limit")
    finally:
        process.terminate()
        process.wait(10)


async def test_a_new_clients_first_burst_is_relayed_whole(proxy_factory):
    """Traefik relays a new client's whole first burst (real Traefik 3.7, fresh-tcp F-UDP-3:
    50 of 50; meshproxy lost every datagram after the 16th while the session's socket
    opened). Bursts of 20, 50 and 500 datagrams, each from a new client sent back to back:
    every one answered, nothing dropped. The client's and the echo server's receive buffers
    are raised so that only the proxy could lose a datagram."""
    server, server_addr = await dns_server(b"ns")
    server.transport.get_extra_info("socket").setsockopt(  # type: ignore[union-attr]
        socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20
    )
    proxy = await udp_proxy(
        proxy_factory, udp_config(server_addr), "--entryPoints.dns.udp.timeout=60s"
    )
    sent = 0
    for size in (20, 50, 500):
        peer = await client(address(proxy))
        peer.transport.get_extra_info("socket").setsockopt(  # type: ignore[union-attr]
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20
        )
        for i in range(size):
            peer.transport.sendto(b"\xff\xff%03d" % i)
        got = sorted([await peer.recv() for _ in range(size)])
        assert got == [b"\xff\xff%03d" % i for i in range(size)]
        sent += size
        peer.transport.close()
    assert metric(proxy, "meshproxy_udp_datagrams_total", direction="from_client") == sent
    assert metric(proxy, "meshproxy_udp_datagrams_dropped_total", reason="pending_full") == 0


async def test_zero_length_datagrams_are_counted_as_dropped_not_relayed(proxy_factory):
    """A zero-length datagram is valid UDP (RFC 768) but Traefik 3.7 relays none (checked with
    the real binary: no answer through its entrypoint from an echo server that answers an
    empty datagram sent directly). meshproxy drops it too, counts it under
    `dropped{reason="empty"}` and not as relayed, and opens no session for it."""
    server, server_addr = await dns_server(b"ns")
    proxy = await udp_proxy(proxy_factory, udp_config(server_addr))
    peer = await client(address(proxy))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as empty:
        for _ in range(3):
            empty.sendto(b"", address(proxy))  # asyncio's sendto(b"") would send nothing
    await wait_for(
        lambda: metric(proxy, "meshproxy_udp_datagrams_dropped_total", reason="empty") == 3,
        5,
        "three empty datagrams dropped",
    )
    assert metric(proxy, "meshproxy_udp_datagrams_total", direction="from_client") == 0
    assert metric(proxy, "meshproxy_udp_sessions_opened_total") == 0
    peer.transport.sendto(b"\xff\xffok")
    assert await peer.recv() == b"\xff\xffok"
    assert sum(server.sources.values()) == 1
