"""Memory per idle connection: meshproxy (1 and 2 workers) vs HAProxy, and what meshproxy's holds.

Each proxy gets a warm-up (as many concurrent connections as a batch below, one request each,
closed: the backend pool is filled), then `--connections` client connections (default 10,000),
held by a separate client process, each make one exchange and stay open and idle:

- `http1`: one keep-alive GET, the whole response read;
- `h2c`: HTTP/2 with prior knowledge (RFC 9113 §3.3), one GET on stream 1 (the h2 library);
- `tcp`, `tls`: a TCP route (plain, or TLS terminated by the proxy) to an echo server, one
  byte echoed. These take two descriptors per connection in the proxy: with a hard open-file
  limit of 20,000, use `--connections 9000`.

The growth of the proxy's RSS (Linux /proc VmRSS: the process's own memory, not the kernel's
socket buffers; with `--workers 2` the supervisor and its workers summed, PSS beside it) over
its idle baseline, divided by the number of connections, is the cost of one idle connection
(issue 15 item 4: at most 50 MB for 10,000 keep-alive connections). HAProxy (1 thread) is
measured in the same run. Connections are opened in batches, bounded in time, over loopback;
the open-file limit is raised as far as the hard limit allows. `--source DIR` runs meshproxy
from another tree (a patch measured beside the working tree). Results:
bench/results/idle_connections<tag>-<when>.json and idle_connections<tag>.md; the summary over
all memory results is bench/memory_summary.py.

`--breakdown` measures instead, in this process, what one idle meshproxy connection holds:
the real entrypoint (sniffer, server, dispatcher, balancer, upstream pool) listens on uvloop,
a child process holds the idle clients (`--kinds http1` or `h2c`), and tracemalloc attributes
the memory that stays allocated per connection to the lines that allocated it;
sys.getsizeof gives the HTTP/1.1 connection object and the values of its slots.

    python bench/idle_connections.py [--connections 10000] [--kinds http1,h2c] [--workers 1,2]
                                     [--no-haproxy] [--source DIR] [--tag=-NAME]
    python bench/idle_connections.py --connections 9000 --kinds tcp,tls --workers 1
    python bench/idle_connections.py --breakdown [--connections 2000] [--kinds h2c]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    bench_dynamic,
    free_port,
    raise_fd_limit,
    rss_bytes,
    save_report,
    start_backend,
    start_haproxy_for,
    start_haproxy_tcp,
    start_meshproxy,
    stop_all,
    timestamp,
    wait_port,
    wait_routers,
)

HOST = "bench.mesh.test"
MIB = 1024 * 1024
BATCH = 200  # connections opened at once (below the listen backlogs: no SYN drops)
REQUEST = f"GET /bench HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


class IdleClient(asyncio.Protocol):
    """Sends one keep-alive request, reads the response, then stays open doing nothing."""

    def __init__(self, answered: asyncio.Future[None]) -> None:
        import httptools

        self.answered = answered
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.answered.done():
            self.answered.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectionError(f"closed before the response: {exc}"))


class IdleH2Client(asyncio.Protocol):
    """h2c with prior knowledge (RFC 9113 §3.3): one GET on stream 1, read to its end, then
    idle; answers the server's SETTINGS and PINGs (the h2 library does) and nothing more."""

    def __init__(self, answered: asyncio.Future[None]) -> None:
        import h2.config
        import h2.connection

        self.answered = answered
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.transport: asyncio.Transport | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.conn.send_headers(
            1,
            [(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", "/bench")],
            end_stream=True,
        )
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events

        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.status = int(dict(event.headers).get(b":status", b"0"))
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and not self.answered.done():
                self.answered.set_result(None)
        if pending := self.conn.data_to_send():
            self.transport.write(pending)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectionError(f"closed before the response: {exc}"))


class IdleEchoClient(asyncio.Protocol):
    """A TCP (or, over `ssl`, TLS) pipe through the proxy to an echo server: one byte sent, its
    echo read, then idle. `status` is 200 once the echo came back (as the HTTP clients')."""

    def __init__(self, answered: asyncio.Future[None]) -> None:
        self.answered = answered
        self.transport: asyncio.Transport | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"x")

    def data_received(self, data: bytes) -> None:
        self.status = 200
        if not self.answered.done():
            self.answered.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectionError(f"closed before the echo: {exc}"))


Client = IdleClient | IdleH2Client | IdleEchoClient
CLIENTS: dict[str, type[Client]] = {
    "http1": IdleClient,
    "h2c": IdleH2Client,
    "tcp": IdleEchoClient,
    "tls": IdleEchoClient,
}


async def open_idle(port: int, count: int, timeout: float, kind: str = "http1") -> list[Client]:
    """`count` connections of `kind` to `port`, each having had one 200 response (or echo),
    left open. `tls`: TLS 1.3, the certificate not verified (the clients' CPU is not what is
    measured)."""
    import ssl

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    clients: list[Client] = []
    make = CLIENTS[kind]
    context = None
    if kind == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    while len(clients) < count:
        batch = [make(loop.create_future()) for _ in range(min(BATCH, count - len(clients)))]
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    loop.create_connection(lambda c=c: c, "127.0.0.1", port, ssl=context)
                    for c in batch
                )
            ),
            max(0.1, deadline - loop.time()),
        )
        await asyncio.wait_for(
            asyncio.gather(*(c.answered for c in batch)), max(0.1, deadline - loop.time())
        )
        assert all(c.status == 200 for c in batch), [c.status for c in batch]
        clients.extend(batch)
    return clients


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a supervisor's workers), from /proc's children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:
                continue
    return found


def tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS (bytes) of `pid` and its descendants, summed. RSS counts the pages a forked
    worker shares with its supervisor twice; PSS (smaps_rollup) splits them between sharers."""
    rss = pss = 0
    for member in descendants(pid):
        try:
            rss += rss_bytes(member)
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, RuntimeError):
            continue  # exited meanwhile
    return {"rss": rss, "pss": pss}


def start_meshproxy_workers(
    workdir: Path,
    port: int,
    admin: int,
    dynamic_yaml: str,
    workers: int,
    source: Path | None = None,
    extra_entrypoints: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """meshproxy with `--workers=N` (its default is one worker per CPU: always explicit here),
    metrics on, fed by a dynamic config file; with N > 1 a supervisor and N worker processes.
    `source`: run the meshproxy package of that tree (`python -m` puts the working directory
    first on sys.path), e.g. a patch measured beside the working tree."""
    entrypoints = tuple(
        f"--entryPoints.{name}.address={address}"
        for name, address in (extra_entrypoints or {}).items()
    )
    return start_meshproxy(
        workdir,
        port,
        admin,
        dynamic_yaml,
        source,
        workers=workers,
        extra=("--api.insecure", *entrypoints),
        pin=False,
    )


def start_echo(port: int) -> subprocess.Popen[bytes]:
    """The echo server behind the TCP and TLS routes (bench/l4_common.py's, uvloop)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    code += f"from l4_common import run_tcp_echo; run_tcp_echo({port})"
    return subprocess.Popen([sys.executable, "-c", code])


def write_certificate(cert_key: tuple[Path, Path], both: Path) -> None:
    """A trustme certificate for the TLS route: certificate and key files (meshproxy), and
    both in one PEM (HAProxy's `crt`)."""
    import trustme

    leaf = trustme.CA().issue_cert(HOST)
    leaf.cert_chain_pems[0].write_to_path(str(cert_key[0]))
    leaf.private_key_pem.write_to_path(str(cert_key[1]))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(both))


def dynamic_with_l4(http_yaml: str, echo: int, kinds: set[str], cert: tuple[Path, Path]) -> str:
    """`http_yaml` plus a TCP router per kind (`tcp`: plain, `tls`: terminated with the
    default certificate), ``HostSNI(`*`)`` to the echo server on entrypoint `kind`."""
    import yaml

    config = yaml.safe_load(http_yaml)
    config["tcp"] = {
        "routers": {
            kind: {
                "entryPoints": [kind],
                "rule": "HostSNI(`*`)",
                "service": "echo",
                **({"tls": {}} if kind == "tls" else {}),
            }
            for kind in kinds
        },
        "services": {"echo": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{echo}"}]}}},
    }
    if "tls" in kinds:
        default = {"certFile": str(cert[0]), "keyFile": str(cert[1])}
        config["tls"] = {"stores": {"default": {"defaultCertificate": default}}}
    return yaml.safe_dump(config)


def wait_ping(admin: int, timeout: float = 30.0) -> None:
    """Wait until the admin entrypoint answers /ping 200 (the config is applied)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"admin port {admin} did not answer /ping")


def close_all(clients: list[Client]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.close()


class Holder:
    """A child process holding idle client connections (so the clients' own memory and CPU
    stay out of the proxy's and this script's way) until `release`."""

    def __init__(self, port: int, count: int, kind: str, timeout: float) -> None:
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--hold", str(port), str(count), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # readline blocks; a child stuck opening is bounded by its own open_idle deadline
        line = self.child.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            self.child.kill()
            raise RuntimeError(f"the {kind} client process did not open {count} connections")

    def release(self) -> None:
        self.child.stdin.close()  # type: ignore[union-attr]
        self.child.wait(60)


def measure(port: int, pid: int, count: int, kind: str, idle_wait: float) -> dict[str, Any]:
    """Memory of `pid` and its workers before, with `count` idle `kind` connections (held by a
    child process), and after they closed."""
    Holder(port, BATCH, kind, 30).release()  # warm-up: pools, label sets, allocator arenas
    time.sleep(1.5)
    before = tree_memory(pid)
    started = time.monotonic()
    holder = Holder(port, count, kind, 60 + count / 50)
    opened = time.monotonic() - started
    # the proxy is idle now; its sweep (every second) shrinks connections idle for 1 s
    time.sleep(idle_wait)
    held = tree_memory(pid)
    holder.release()
    time.sleep(1.5)
    after = tree_memory(pid)
    return {
        "kind": kind,
        "connections": count,
        "seconds_to_open": opened,
        "rss_before_bytes": before["rss"],
        "rss_idle_bytes": held["rss"],
        "rss_after_close_bytes": after["rss"],
        "pss_before_bytes": before["pss"],
        "pss_idle_bytes": held["pss"],
        "rss_growth_bytes": held["rss"] - before["rss"],
        "pss_growth_bytes": held["pss"] - before["pss"],
        "bytes_per_idle_connection": (held["rss"] - before["rss"]) / count,
    }


def compare(args: argparse.Namespace) -> int:
    limit = raise_fd_limit(args.connections * 2 + 1000)
    if limit < args.connections + 500:
        raise SystemExit(f"open-file limit {limit} is too low for {args.connections} connections")
    if args.haproxy and shutil.which("haproxy") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "haproxy"], check=True)
    from meshproxy.build_info import hot_path_state

    kinds = args.kinds.split(",")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        backend, echo = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = [start_backend(backend)]
        l4 = {"tcp", "tls"} & set(kinds)
        cert, both = (workdir / "server.crt", workdir / "server.key"), workdir / "server.pem"
        if l4:
            procs.append(start_echo(echo))
            write_certificate(cert, both)
        try:
            wait_port(backend)
            suffix = f"@{args.source}" if args.source else ""
            targets = [f"meshproxy-w{n}{suffix}" for n in args.workers] + (
                ["haproxy"] if args.haproxy else []
            )
            for target in targets:
                ports = {kind: free_port() for kind in kinds}
                ports["http1"] = ports["h2c"] = (
                    ports.get("http1") or ports.get("h2c") or free_port()
                )
                started: list[subprocess.Popen[bytes]] = []
                pids: dict[str, int] = {}
                if target == "haproxy":
                    maxconn = args.connections + 100
                    for kind in kinds:
                        port = ports[kind]
                        if kind in ("http1", "h2c") and ("http1" in pids or "h2c" in pids):
                            pids[kind] = pids.get("http1") or pids["h2c"]  # one HTTP frontend
                            continue
                        if kind in ("http1", "h2c"):
                            proxy = start_haproxy_for(workdir, port, backend, HOST, maxconn)
                        else:
                            ssl = f"ssl crt {both}" if kind == "tls" else ""
                            proxy = start_haproxy_tcp(workdir, port, echo, ssl, maxconn)
                        started.append(proxy)
                        pids[kind] = proxy.pid
                        wait_port(port)
                else:
                    admin = free_port()
                    workers = int(target.removeprefix("meshproxy-w").split("@")[0])
                    dynamic = bench_dynamic(backend, HOST)
                    extra = {k: f"127.0.0.1:{ports[k]}" for k in l4}
                    if l4:
                        dynamic = dynamic_with_l4(dynamic, echo, l4, cert)
                    proxy = start_meshproxy_workers(
                        workdir, ports["http1"], admin, dynamic, workers, args.source, extra
                    )
                    started.append(proxy)
                    wait_port(ports["http1"])
                    wait_ping(admin)
                    if l4:
                        wait_routers(admin, "tcp", l4)
                    pids = dict.fromkeys(kinds, proxy.pid)
                procs += started
                for kind in kinds:
                    result = measure(
                        ports[kind], pids[kind], args.connections, kind, args.idle_wait
                    )
                    results.setdefault(target, {})[kind] = result
                    print(
                        f"{target:14s} {kind:6s} +{result['rss_growth_bytes'] / MIB:6.1f} MiB RSS "
                        f"({result['bytes_per_idle_connection']:.0f} B/connection), "
                        f"+{result['pss_growth_bytes'] / MIB:6.1f} MiB PSS",
                        flush=True,
                    )
                for proxy in started:
                    proxy.terminate()
                    proxy.wait(30)
                    procs.remove(proxy)
        finally:
            stop_all(procs)
    report = {
        "when": timestamp(),
        "setup": {
            "idle_connections": args.connections,
            "kinds": kinds,
            "opened_per_batch": BATCH,
            "clients": "a separate process (uvloop; h2c with the h2 library)",
            "idle_seconds_before_reading": args.idle_wait,
            "meshproxy_workers": args.workers,
            "meshproxy_source": str(args.source or "the working tree"),
            "haproxy_threads": 1,
            "meshproxy_hot_path": hot_path_state(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "note": "shared 2-core VM, other benchmarks and test runs beside it",
        },
        "results": results,
    }
    lines = [
        f"# RSS of idle keep-alive connections ({report['when']})",
        "",
        f"{args.connections:,} client connections (from a separate process), each after one GET, "
        f"open and idle {args.idle_wait:g} s; loopback; meshproxy hot path: {hot_path_state()}; "
        "with 2 workers the supervisor and both workers are summed (RSS counts pages shared "
        "after fork twice, PSS splits them). Shared, loaded 2-core VM (load average "
        f"{os.getloadavg()[0]:.1f} at the end).",
        "",
        "| proxy | connections | RSS before MiB | with idle MiB | growth MiB | after close MiB "
        "| bytes per idle connection | PSS growth MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_kind in results.items():
        for kind, r in by_kind.items():
            lines.append(
                f"| {name} | {kind} | {r['rss_before_bytes'] / MIB:.1f} "
                f"| {r['rss_idle_bytes'] / MIB:.1f} | {r['rss_growth_bytes'] / MIB:+.1f} "
                f"| {r['rss_after_close_bytes'] / MIB:.1f} "
                f"| {r['bytes_per_idle_connection']:.0f} | {r['pss_growth_bytes'] / MIB:+.1f} |"
            )
    save_report(f"idle_connections{args.tag}", report, lines)
    return 0


# -- what one idle meshproxy connection holds --------------------------------------------


def hold(port: int, count: int, kind: str) -> int:
    """Child process: open the idle clients, say so, wait for stdin to close."""
    import uvloop

    async def run() -> None:
        clients = await open_idle(port, count, 60 + count / 50, kind)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        close_all(clients)

    raise_fd_limit(count + 500)
    uvloop.run(run())
    return 0


def slot_sizes(obj: Any) -> dict[str, int]:
    """sys.getsizeof of the value of each slot of `obj` (shared values included: the reader
    tells them apart with the ids reported next to them)."""
    names: list[str] = []
    for cls in type(obj).__mro__:
        # a mypyc-compiled class lists its attributes in __mypyc_attrs__, not __slots__
        names += getattr(cls, "__slots__", ()) or getattr(cls, "__mypyc_attrs__", ())
    sizes: dict[str, int] = {}
    for name in names:
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        sizes[name] = sys.getsizeof(value)
    return sizes


def breakdown(args: argparse.Namespace) -> int:
    import tracemalloc

    import uvloop

    from meshproxy.build_info import hot_path_state
    from meshproxy.http.server import EntryPointSettings, HTTPEntryPoint
    from meshproxy.runtime.dispatch import make_dispatcher
    from meshproxy.runtime.standalone import standalone

    raise_fd_limit(args.connections * 2 + 1000)
    count = args.connections
    kind = args.kinds.split(",")[0]
    backend_port = free_port()
    procs = [start_backend(backend_port)]
    wait_port(backend_port)

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        rig = standalone(
            {
                "http": {
                    "routers": {
                        "bench": {
                            "entryPoints": ["web"],
                            "service": "app",
                            "rule": f"Host(`{HOST}`) && PathPrefix(`/bench`)",
                        }
                    },
                    "services": {
                        "app": {
                            "loadBalancer": {
                                "servers": [{"url": f"http://127.0.0.1:{backend_port}"}]
                            }
                        }
                    },
                }
            }
        )
        metrics, manager = rig.metrics, rig.manager
        port = free_port()
        entry = HTTPEntryPoint(
            EntryPointSettings(name="web", port=port),
            make_dispatcher("web", manager, metrics),
            on_open=lambda delta: metrics.connection_delta("web", "TCP", delta),
        )
        server = await loop.create_server(entry.connection_factory, "127.0.0.1", port, backlog=4096)

        async def clients(n: int) -> subprocess.Popen[str]:
            child = subprocess.Popen(
                [sys.executable, __file__, "--hold", str(port), str(n), kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            line = await loop.run_in_executor(None, child.stdout.readline)  # type: ignore[union-attr]
            assert line.strip() == "ready", line
            await asyncio.sleep(0.5)
            return child

        def release(child: subprocess.Popen[str]) -> None:
            child.stdin.close()  # type: ignore[union-attr]
            child.wait(30)

        warm = await clients(BATCH)  # fills the backend pool, the metric label sets, ...
        release(warm)
        await asyncio.sleep(0.5)
        gc.collect()
        # Compiled code has no frames: run with MESHPROXY_PURE_PYTHON=1 to see its lines.
        tracemalloc.start(8)
        before = tracemalloc.take_snapshot()
        rss_before = rss_bytes_self()
        child = await clients(count)

        def holdings() -> dict[str, Any]:
            """What the idle connections hold now, per connection, against `before`."""
            gc.collect()
            after = tracemalloc.take_snapshot()
            lines = [
                {
                    "where": f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}",
                    "bytes_per_connection": stat.size_diff / count,
                    "blocks_per_connection": stat.count_diff / count,
                }
                for stat in after.compare_to(before, "lineno")[:25]
                if stat.size_diff > count * 8
            ]
            objects: dict[str, Any] = {"connections open": len(entry.connections)}
            if kind == "http1" and entry.connections:
                conn = next(iter(entry.connections))
                parser = getattr(conn, "parser", None)
                objects |= {
                    "H1ServerConnection": sys.getsizeof(conn),
                    "slots": slot_sizes(conn),
                    "parser (httptools.HttpRequestParser, None once shrunk)": (
                        sys.getsizeof(parser) if parser is not None else 0
                    ),
                    "transport (uvloop TCPTransport)": sys.getsizeof(conn.transport),
                }
            return {
                "traced_bytes_per_connection": sum(
                    s.size_diff for s in after.compare_to(before, "filename")
                )
                / count,
                "top_lines": lines,
                "objects_of_one_connection": objects,
            }

        rss_held = rss_bytes_self()
        just_answered = holdings()
        # The daemon sweeps its entrypoints every second; a connection idle for over a
        # second gives back what only a request in progress needs (server.py `_shrink`).
        await asyncio.sleep(1.2)
        entry.sweep()
        after_sweep = holdings()
        tracemalloc.stop()
        release(child)
        server.close()
        return {
            "connections": count,
            "kind": kind,
            "hot_path": hot_path_state(),
            "rss_bytes_per_connection_with_tracemalloc": (rss_held - rss_before) / count,
            "just_answered": just_answered,
            "after_idle_sweep": after_sweep,
        }

    try:
        result = uvloop.run(run())
    finally:
        stop_all(procs)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"idle_connections_breakdown-{timestamp()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def rss_bytes_self() -> int:
    import os

    return rss_bytes(os.getpid())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--no-haproxy", dest="haproxy", action="store_false")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument(
        "--idle-wait", type=float, default=3.0, help="seconds idle before RSS is read"
    )
    parser.add_argument("--kinds", default="http1,h2c", help="http1 and/or h2c, comma-separated")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2],
        help="meshproxy --workers values to measure, comma-separated",
    )
    parser.add_argument(
        "--source", type=Path, default=None, help="run meshproxy from this source tree"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--hold", nargs=3, metavar=("PORT", "COUNT", "KIND"), help="internal")
    args = parser.parse_args()
    if args.hold:
        return hold(int(args.hold[0]), int(args.hold[1]), args.hold[2])
    if args.breakdown:
        args.connections = args.connections or 2_000
        return breakdown(args)
    args.connections = args.connections or 10_000
    return compare(args)


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    raise SystemExit(code)
