"""The UDP session table (meshproxy/l4/udp.py) in-process, over real loopback sockets: one
session per client address, idle expiry, caps with least-recently-active eviction, server
errors, reloads. Rules: reference/traefik-proxy.md §1.6 (UDP routers and services), §4.1 (UDP
WRR), §5.4 (`udp.timeout`, a session per client address, backend chosen once per session)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from typing import Any

import pytest
import uvloop

from meshproxy.l4 import udp
from meshproxy.l4.udp import (
    PENDING_BYTES,
    PENDING_DATAGRAMS,
    UDPEntryPoint,
    UDPRoute,
    UDPSettings,
    UDPTarget,
    fd_budget_warning,
    udp_settings,
)
from meshproxy.observability.metrics import UDPCounters
from tests.helpers import wait_for

# pytest-asyncio 1.x would have a conftest hook (pytest_asyncio_loop_factories) for this; the
# fixture keeps the two loops local to this module.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def event_loop_policy(request):
    """Every test on uvloop (what the proxy runs on) and on asyncio's own loop: their datagram
    transports differ (reads per wake-up, when a closed socket's fd is released)."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


class Peer(asyncio.DatagramProtocol):
    """A datagram socket that queues what it receives (client or backend)."""

    def __init__(self, tag: bytes = b"", echo: bool = False) -> None:
        self.tag = tag
        self.echo = echo
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.sources: Counter[Any] = Counter()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sources[addr] += 1
        if self.echo:
            self.transport.sendto(self.tag + data, addr)  # type: ignore[union-attr]
        else:
            self.received.put_nowait((data, addr))

    async def recv(self, timeout: float = 5.0) -> bytes:
        data, _ = await asyncio.wait_for(self.received.get(), timeout)
        return data


async def backend(tag: bytes) -> tuple[Peer, tuple[str, int]]:
    """An echo server on loopback that prefixes its replies with `tag`."""
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        lambda: Peer(tag, echo=True), local_addr=("127.0.0.1", 0)
    )
    return peer, transport.get_extra_info("sockname")


async def client(proxy: tuple[str, int], ip: str = "127.0.0.1") -> Peer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(Peer, local_addr=(ip, 0), remote_addr=proxy)
    return peer


class Proxy:
    """A UDPEntryPoint listening on loopback, with a route that tests can swap (a reload)."""

    def __init__(self, route: UDPRoute | None, settings: UDPSettings) -> None:
        self.route = route
        self.counters = UDPCounters()
        self.entry = UDPEntryPoint("udp", lambda: self.route, settings, self.counters)
        self.address: tuple[str, int] = ("", 0)

    async def start(self) -> Proxy:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.entry, local_addr=("127.0.0.1", 0)
        )
        self.address = transport.get_extra_info("sockname")
        return self


def route(name: str, *servers: tuple[str, int]) -> UDPRoute:
    return UDPRoute(name, UDPTarget(f"{name}-svc", [(s, 1) for s in servers]))


def sockets_to(server: tuple[str, int]) -> int:
    """How many UDP sockets this process holds connected to `server` (an IPv4 loopback
    address): the server sockets of sessions. Counted from /proc, so sockets other tests left
    for the garbage collector do not blur the count."""
    host = "".join(f"{int(part):02X}" for part in reversed(server[0].split(".")))
    remote = f"{host}:{server[1]:04X}"
    with open("/proc/self/net/udp") as lines:
        next(lines)
        inodes = {f[9] for f in (line.split() for line in lines) if f[2] == remote}
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


@pytest.fixture
async def proxies():
    started: list[Proxy] = []

    async def make(route: UDPRoute | None, **settings: Any) -> Proxy:
        proxy = await Proxy(route, UDPSettings(**settings)).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.entry.close()


async def test_one_session_per_client_address_and_replies_reach_their_own_client(proxies):
    """§5.4: a session per client address, its backend chosen once; each session has its own
    connected socket, so replies go back to the client that asked (20 clients, 5 each)."""
    a, a_addr = await backend(b"a:")
    b, b_addr = await backend(b"b:")
    proxy = await proxies(route("r@file", a_addr, b_addr), timeout=60.0)
    clients = [await client(proxy.address) for _ in range(20)]
    for round_ in range(5):
        for i, c in enumerate(clients):
            c.transport.sendto(f"{i}.{round_}".encode())
        for i, c in enumerate(clients):
            reply = await c.recv()
            assert reply[2:] == f"{i}.{round_}".encode()
            if round_ == 0:
                c.tag = reply[:2]  # the server this client's session picked
            assert reply[:2] == c.tag  # ...and keeps
    assert len(proxy.entry.sessions) == 20
    assert Counter(c.tag for c in clients) == {b"a:": 10, b"b:": 10}  # round robin
    # one upstream socket per session: each backend saw 10 source ports, 5 datagrams each
    assert sorted(a.sources.values()) == [5] * 10 and sorted(b.sources.values()) == [5] * 10
    assert proxy.counters.opened == 20
    assert proxy.counters.datagrams_from_client == proxy.counters.datagrams_from_server == 100


async def test_largest_ipv4_datagram_is_relayed_whole_both_ways(proxies):
    """65,507 bytes, the largest UDP payload over IPv4, crosses unsplit both ways."""
    _, addr = await backend(b"")
    proxy = await proxies(route("r@file", addr))
    c = await client(proxy.address)
    payload = bytes(range(256)) * 255 + b"x" * 227
    assert len(payload) == 65507
    c.transport.sendto(payload)
    assert await c.recv() == payload
    assert proxy.counters.bytes_from_client == proxy.counters.bytes_from_server == 65507


async def test_idle_session_ends_after_the_timeout_and_not_before(proxies):
    """`udp.timeout`: a session with no datagram either way for the timeout ends (its socket
    closed); activity keeps it; the next datagram opens a new session."""
    _, addr = await backend(b"")
    proxy = await proxies(route("r@file", addr), timeout=0.4)
    loop = asyncio.get_running_loop()
    c = await client(proxy.address)
    # traffic every 0.1 s for 1 s (2.5 timeouts): one session throughout
    for i in range(10):
        if i:
            await asyncio.sleep(0.1)  # the client's pace, not a wait for the proxy
        c.transport.sendto(b"%d" % i)
        assert await c.recv() == b"%d" % i
    last = loop.time()  # the last datagram crossed the proxy just before
    assert proxy.counters.opened == 1 and len(proxy.entry.sessions) == 1
    await wait_for(lambda: not proxy.entry.sessions, 5, "the idle session to expire")
    idle = loop.time() - last
    assert idle >= 0.4, f"expired after {idle:.3f}s, before the 0.4 s timeout"
    assert idle < 0.4 + 2 * UDPSettings(timeout=0.4).sweep + 0.3  # the sweep's bound + slack
    assert proxy.counters.closed == {"idle": 1} and proxy.counters.sessions == 0
    await wait_for(lambda: sockets_to(addr) == 0, 5, "the session's server socket closed")
    c.transport.sendto(b"again")
    assert await c.recv() == b"again"
    assert proxy.counters.opened == 2


async def test_per_source_cap_evicts_that_sources_least_recently_active_session(proxies):
    """Bad input (issue 12): sessions per client IP are capped; the least recently active one
    of that IP makes room, so a client that keeps talking keeps its session."""
    _, addr = await backend(b"")
    proxy = await proxies(route("r@file", addr), timeout=10.0, max_sessions_per_source=4)
    entry = proxy.entry
    busy, b, c = [await client(proxy.address) for _ in range(3)]
    for peer in (busy, b, c):
        peer.transport.sendto(b"hi")
        assert await peer.recv() == b"hi"
    clock = entry.clock
    await wait_for(lambda: entry.clock != clock, 5, "a sweep")
    busy.transport.sendto(b"still here")  # the busy client is the most recent now
    assert await busy.recv() == b"still here"
    newcomers = [await client(proxy.address) for _ in range(3)]
    for peer in newcomers:
        peer.transport.sendto(b"new")
        assert await peer.recv() == b"new"
        assert len(entry.sessions) <= 4
    assert proxy.counters.closed == {"evicted_source": 2}
    kept = {s.client[1] for s in entry.sessions.values()}
    assert busy.transport.get_extra_info("sockname")[1] in kept
    assert b.transport.get_extra_info("sockname")[1] not in kept
    assert c.transport.get_extra_info("sockname")[1] not in kept


async def test_entrypoint_cap_holds_under_a_flood_from_many_addresses(proxies):
    """Bad input (issue 12): a flood from many source addresses (40 loopback IPs x 3 ports)
    never holds more than `maxSessions` sessions nor their sockets; the evictions are
    counted; once the flood is over every socket is released."""
    _, addr = await backend(b"")
    proxy = await proxies(
        route("r@file", addr), timeout=60.0, max_sessions=16, max_sessions_per_source=2
    )
    entry = proxy.entry
    peers = [await client(proxy.address, f"127.0.0.{2 + i}") for i in range(40) for _ in range(3)]
    for peer in peers:  # 120 datagrams, bounded
        peer.transport.sendto(b"flood")
        await peer.recv()
        assert len(entry.sessions) <= 16
        assert sum(len(t) for t in entry.by_source.values()) == len(entry.sessions)
        assert sockets_to(addr) <= 16  # server sockets of live sessions only
    assert proxy.counters.opened == 120
    closed = proxy.counters.closed
    # each IP's third port evicts its first (40); the other 64 evictions are the table's
    assert closed == {"evicted_source": 40, "evicted_entrypoint": 120 - 40 - 16}
    assert proxy.counters.sessions == len(entry.sessions) == 16
    assert sockets_to(addr) == 16
    entry.close()  # shutdown
    await wait_for(lambda: sockets_to(addr) == 0, 5, "every server socket closed")
    assert proxy.counters.closed["shutdown"] == 16 and proxy.counters.sessions == 0
    for peer in peers:
        peer.transport.close()


async def test_a_refused_server_ends_its_sessions_and_leaks_no_socket(proxies):
    """Traefik ends a session when reading from the server fails: the ICMP port unreachable
    of a closed port (ECONNREFUSED) closes the session's socket and is counted."""
    loop = asyncio.get_running_loop()
    probe, _ = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    closed_port = probe.get_extra_info("sockname")
    probe.close()
    proxy = await proxies(route("r@file", closed_port))
    peers = [await client(proxy.address) for _ in range(30)]
    for peer in peers:
        peer.transport.sendto(b"anyone?")
    await wait_for(
        lambda: proxy.counters.closed.get("upstream_error") == 30, 5, "30 refused sessions"
    )
    assert not proxy.entry.sessions and not proxy.entry.by_source
    assert proxy.counters.sessions == 0
    for peer in peers:
        peer.transport.close()
    await wait_for(lambda: sockets_to(closed_port) == 0, 5, "every server socket closed")


async def test_reload_keeps_live_sessions_and_a_removed_router_ends_them(proxies):
    """Traefik (§5.3): established UDP sessions finish on the handler they started with while
    new ones take the new config; a session whose router no longer serves the entrypoint ends
    at the next sweep; with no router left, datagrams are dropped and counted."""
    a, a_addr = await backend(b"a:")
    _, b_addr = await backend(b"b:")
    proxy = await proxies(route("r@file", a_addr), timeout=10.0)
    old = await client(proxy.address)
    old.transport.sendto(b"1")
    assert await old.recv() == b"a:1"
    proxy.route = route("r@file", b_addr)  # same router, new service: a reload
    new = await client(proxy.address)
    new.transport.sendto(b"2")
    assert await new.recv() == b"b:2"
    old.transport.sendto(b"3")
    assert await old.recv() == b"a:3"  # the live session keeps its server
    clock = proxy.entry.clock
    await wait_for(lambda: proxy.entry.clock != clock, 5, "a sweep")
    assert len(proxy.entry.sessions) == 2  # same router name: both live on
    proxy.route = route("other@file", b_addr)  # router r removed, another serves the entrypoint
    await wait_for(lambda: not proxy.entry.sessions, 5, "r's sessions to end")
    assert proxy.counters.closed == {"router_removed": 2}
    old.transport.sendto(b"4")
    assert await old.recv() == b"b:4"  # a new session, on the new router
    proxy.route = None
    await wait_for(lambda: not proxy.entry.sessions, 5, "the last session to end")
    old.transport.sendto(b"5")
    await wait_for(lambda: proxy.counters.dropped.get("no_route") == 1, 5, "a dropped datagram")
    assert old.received.empty() and a.sources  # nothing came back


async def test_weighted_service_splits_sessions_by_weight(proxies):
    """§1.6/§4.1: a `weighted` UDP service picks a child per session by weight (3:1 over 40
    sessions: 30 and 10), and a session stays with its pick."""
    _, a_addr = await backend(b"a:")
    _, b_addr = await backend(b"b:")
    heavy = UDPTarget("heavy@file", [(a_addr, 1)])
    light = UDPTarget("light@file", [(b_addr, 1)])
    proxy = await proxies(UDPRoute("r@file", UDPTarget("split@file", [(heavy, 3), (light, 1)])))
    picks: Counter[bytes] = Counter()
    for _ in range(40):
        peer = await client(proxy.address)
        for _ in range(2):
            peer.transport.sendto(b"x")
            picks[(await peer.recv())[:2]] += 1
        peer.transport.close()
    assert picks == {b"a:": 60, b"b:": 20}


async def test_a_new_sessions_burst_to_an_ip_server_is_sent_whole_at_once(proxies):
    """Traefik relays a new client's whole burst (checked with the real binary: 50 of 50):
    with an IP server the session's socket is connected synchronously, so 500 datagrams
    delivered in one go, before the event loop turns, all reach the server in order, none
    held or dropped; a zero-length datagram is dropped as `empty` (Traefik relays none), opens
    no session and is not counted as relayed."""
    peer, addr = await backend(b"")
    seen: list[bytes] = []
    peer.datagram_received = lambda data, _: seen.append(data)  # type: ignore[method-assign]
    peer.transport.get_extra_info("socket").setsockopt(  # type: ignore[union-attr]
        socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20
    )
    proxy = await proxies(route("r@file", addr))
    c = await client(proxy.address)
    source = c.transport.get_extra_info("sockname")
    for i in range(500):
        proxy.entry.datagram_received(b"%03d" % i, source)
    assert proxy.entry.pending_bytes == 0 and not proxy.counters.dropped
    await wait_for(lambda: len(seen) == 500, 5, "the whole burst at the server")
    assert seen == [b"%03d" % i for i in range(500)]
    proxy.entry.datagram_received(b"", ("127.0.0.1", 1))
    assert proxy.counters.dropped == {"empty": 1}
    assert proxy.counters.opened == 1 and proxy.counters.datagrams_from_client == 500


async def named_backend() -> tuple[Peer, tuple[str, int]]:
    """An echo server reached by name (`localhost`, on the address the name resolves to):
    the session's socket then opens after an asynchronous resolution."""
    loop = asyncio.get_running_loop()
    info = await loop.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)
    transport, peer = await loop.create_datagram_endpoint(
        lambda: Peer(b"", echo=True), local_addr=info[0][4][:2]
    )
    return peer, ("localhost", transport.get_extra_info("sockname")[1])


async def test_datagrams_held_while_a_server_name_resolves_are_bounded(proxies, monkeypatch):
    """Datagrams that arrive before a named server's socket is open are held, at most
    PENDING_DATAGRAMS (4,096; 16 here so the backend's socket buffer takes them all), then
    sent in order; the rest are dropped and counted."""
    monkeypatch.setattr(udp, "PENDING_DATAGRAMS", 16)
    peer, addr = await named_backend()
    proxy = await proxies(route("r@file", addr))
    c = await client(proxy.address)
    source = c.transport.get_extra_info("sockname")
    for i in range(40):  # in one go, before the event loop can open the socket
        proxy.entry.datagram_received(b"%02d" % i, source)
    got = [await c.recv() for _ in range(16)]
    assert got == [b"%02d" % i for i in range(16)]
    assert proxy.counters.dropped == {"pending_full": 40 - 16}
    assert sum(peer.sources.values()) == 16
    assert proxy.entry.pending_bytes == 0
    assert PENDING_DATAGRAMS == 4096


async def test_bytes_held_for_opening_sessions_are_bounded_per_entrypoint(proxies, monkeypatch):
    """Nothing grows without bound: the datagrams held for all the sessions still resolving
    their server's name are at most PENDING_BYTES together, each charged PENDING_OVERHEAD
    more than its length (4 MiB; 60,640 here so the backend's socket buffer takes the lot: 100
    new clients x 6,000 bytes in one go, 10 held and relayed, 90 dropped and counted)."""
    monkeypatch.setattr(udp, "PENDING_BYTES", 60_000 + 10 * udp.PENDING_OVERHEAD)
    peer, addr = await named_backend()
    proxy = await proxies(route("r@file", addr))
    size = 6_000
    for i in range(100):
        proxy.entry.datagram_received(b"%03d" % i + b"." * (size - 3), ("127.0.0.1", 20000 + i))
        assert proxy.entry.pending_bytes <= udp.PENDING_BYTES
    assert proxy.counters.dropped == {"pending_full": 90}
    await wait_for(lambda: sum(peer.sources.values()) == 10, 5, "the held datagrams sent")
    assert proxy.entry.pending_bytes == 0
    assert PENDING_BYTES == 4 << 20


async def test_a_socket_that_cannot_open_ends_its_session(proxies):
    """A server socket that cannot be opened (here: a scope-less link-local multicast address,
    EINVAL at connect; likewise an unresolvable name or no descriptor left) ends the session,
    counted as open_error, with nothing held; the next datagram tries again."""
    proxy = await proxies(route("r@file", ("ff02::1", 53)))
    c = await client(proxy.address)
    c.transport.sendto(b"x")
    await wait_for(lambda: proxy.counters.closed.get("open_error") == 1, 5, "the failed open")
    assert not proxy.entry.sessions and proxy.entry.pending_bytes == 0
    c.transport.sendto(b"y")
    await wait_for(lambda: proxy.counters.closed.get("open_error") == 2, 5, "a second attempt")


async def test_no_server_drops_the_datagram_and_opens_no_session(proxies):
    """Traefik: a UDP service with no server drops the session."""
    proxy = await proxies(UDPRoute("r@file", UDPTarget("empty@file", [])))
    c = await client(proxy.address)
    c.transport.sendto(b"x")
    await wait_for(lambda: proxy.counters.dropped.get("no_server") == 1, 5, "a drop")
    assert not proxy.entry.sessions and proxy.counters.opened == 0


def test_settings_from_the_static_config_and_their_bounds():
    """`entryPoints.X.udp.timeout` (3 s default; Traefik refuses a timeout <= 0) and the caps."""
    from meshproxy.config.static import build_static

    static, _ = build_static(
        None,
        [
            "--entryPoints.dns.address=:5353/udp",
            "--entryPoints.dns.udp.timeout=500ms",
            "--entryPoints.dns.udp.maxSessions=100",
            "--entryPoints.dns.udp.maxSessionsPerSource=10",
            "--entryPoints.plain.address=:5354/udp",
        ],
    )
    assert udp_settings(static.entry_points["dns"]) == UDPSettings(0.5, 100, 10)
    assert udp_settings(static.entry_points["plain"]) == UDPSettings()
    assert UDPSettings().timeout == 3.0 and UDPSettings().sweep == 0.3
    assert UDPSettings(timeout=3600).sweep == 1.0
    with pytest.raises(ValueError, match="greater than zero"):
        UDPSettings(timeout=0)
    with pytest.raises(ValueError, match="at least 1"):
        UDPSettings(max_sessions_per_source=0)


def test_session_caps_beyond_half_the_open_file_limit_are_warned():
    """One socket per session: caps that could take more than half the file descriptors
    (Traefik Mesh's 25 UDP entrypoints x 4096 > 20000 / 2) are warned about at start."""
    mesh = {f"udp-{15000 + i}": UDPSettings() for i in range(25)}
    warning = fd_budget_warning(mesh, limit=20000)
    assert warning is not None and "102400 sessions" in warning and "20000" in warning
    assert fd_budget_warning(mesh, limit=1 << 20) is None
    assert fd_budget_warning({"dns": UDPSettings(max_sessions=100)}, limit=256) is None
