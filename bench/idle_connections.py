"""Memory per idle keep-alive connection: meshproxy vs HAProxy, and what meshproxy's holds.

Each proxy gets a warm-up (as many concurrent connections as a batch below, one request each,
closed: the backend pool is filled), then `--connections` client connections (default 10,000)
each send one keep-alive GET, read the whole response, and stay open and idle. The growth of
the proxy's RSS (Linux /proc VmRSS: the process's own memory, not the kernel's socket buffers)
divided by the number of connections is the cost of one idle connection (issue 9 item 3).
Connections are opened in batches, bounded in time, over loopback; the open-file limit is
raised as far as the hard limit allows. Results: bench/results/idle_connections-<when>.json
and bench/results/idle_connections.md.

`--breakdown` measures instead, in this process, what one idle meshproxy connection holds:
the real entrypoint (server, dispatcher, balancer, upstream pool) listens on uvloop, a child
process holds the idle clients, and tracemalloc attributes the memory that stays allocated per
connection to the lines that allocated it; sys.getsizeof gives the connection object and the
values of its slots.

    python bench/idle_connections.py [--connections 10000] [--no-haproxy]
    python bench/idle_connections.py --breakdown [--connections 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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
    start_meshproxy,
    stop_all,
    timestamp,
    wait_port,
)

HOST = "bench.mesh.test"
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


async def open_idle(port: int, count: int, timeout: float) -> list[IdleClient]:
    """`count` connections to `port`, each having had one 200 response, left open."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    clients: list[IdleClient] = []
    while len(clients) < count:
        batch: list[IdleClient] = []
        for _ in range(min(BATCH, count - len(clients))):
            client = IdleClient(loop.create_future())
            batch.append(client)
        await asyncio.wait_for(
            asyncio.gather(
                *(loop.create_connection(lambda c=c: c, "127.0.0.1", port) for c in batch)
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
    workdir: Path, port: int, admin: int, dynamic_yaml: str, workers: int
) -> subprocess.Popen[bytes]:
    """meshproxy with `--workers=N` (its default is one worker per CPU: always explicit here),
    metrics on, fed by a dynamic config file; with N > 1 a supervisor and N worker processes."""
    dynamic = workdir / f"dynamic-{port}.yaml"
    dynamic.write_text(dynamic_yaml)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "proxy",
            f"--workers={workers}",
            f"--entryPoints.web.address=127.0.0.1:{port}",
            f"--entryPoints.traefik.address=127.0.0.1:{admin}",
            f"--providers.file.filename={dynamic}",
            "--metrics.prometheus=true",
            "--ping",
            "--log.level=ERROR",
        ]
    )


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


def close_all(clients: list[IdleClient]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.close()


def measure(port: int, pid: int, count: int, idle_wait: float) -> dict[str, Any]:
    """RSS of `pid` before and with `count` idle connections, and after they closed."""
    import uvloop

    async def run() -> dict[str, Any]:
        warm = await open_idle(port, BATCH, 30)
        close_all(warm)
        await asyncio.sleep(1.0)
        before = rss_bytes(pid)
        clients = await open_idle(port, count, 60 + count / 100)
        # the proxy is idle now; its sweep (every second) shrinks connections idle for 1 s
        await asyncio.sleep(idle_wait)
        held = rss_bytes(pid)
        close_all(clients)
        await asyncio.sleep(1.0)
        after = rss_bytes(pid)
        return {
            "rss_before_bytes": before,
            "rss_idle_bytes": held,
            "rss_after_close_bytes": after,
            "bytes_per_idle_connection": (held - before) / count,
        }

    return uvloop.run(run())


def compare(args: argparse.Namespace) -> int:
    limit = raise_fd_limit(args.connections * 2 + 1000)
    if limit < args.connections + 500:
        raise SystemExit(f"open-file limit {limit} is too low for {args.connections} connections")
    if args.haproxy and shutil.which("haproxy") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "haproxy"], check=True)
    from meshproxy.build_info import hot_path_state

    results: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        backend = free_port()
        try:
            procs.append(start_backend(backend))
            wait_port(backend)
            port, admin = free_port(), free_port()
            mesh = start_meshproxy(workdir, port, admin, bench_dynamic(backend, HOST))
            procs.append(mesh)
            wait_port(port)
            results["meshproxy"] = measure(port, mesh.pid, args.connections, args.idle_wait)
            if args.haproxy:
                port = free_port()
                haproxy = start_haproxy_for(
                    workdir, port, backend, HOST, maxconn=args.connections + 100
                )
                procs.append(haproxy)
                wait_port(port)
                results["haproxy"] = measure(port, haproxy.pid, args.connections, args.idle_wait)
        finally:
            stop_all(procs)
    report = {
        "when": timestamp(),
        "setup": {
            "idle_connections": args.connections,
            "opened_per_batch": BATCH,
            "idle_seconds_before_reading": args.idle_wait,
            "meshproxy_workers": 1,
            "haproxy_threads": 1,
            "meshproxy_hot_path": hot_path_state(),
        },
        "results": results,
    }
    mib = 1024 * 1024
    lines = [
        f"# RSS per idle keep-alive connection ({report['when']})",
        "",
        f"{args.connections:,} client connections, each after one GET, open and idle; "
        f"loopback; meshproxy hot path: {hot_path_state()}.",
        "",
        "| proxy | RSS before MiB | with idle connections MiB | after they closed MiB "
        "| bytes per idle connection |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rss_before_bytes'] / mib:.1f} | {r['rss_idle_bytes'] / mib:.1f} "
            f"| {r['rss_after_close_bytes'] / mib:.1f} | {r['bytes_per_idle_connection']:.0f} |"
        )
    save_report("idle_connections", report, lines)
    return 0


# -- what one idle meshproxy connection holds --------------------------------------------


def hold(port: int, count: int) -> int:
    """Child process of --breakdown: open the idle clients, say so, wait for stdin to close."""
    import uvloop

    async def run() -> None:
        clients = await open_idle(port, count, 60 + count / 100)
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
        server = await loop.create_server(entry.protocol_factory, "127.0.0.1", port, backlog=4096)

        async def clients(n: int) -> subprocess.Popen[str]:
            child = subprocess.Popen(
                [sys.executable, __file__, "--hold", str(port), str(n)],
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
            conn = next(iter(entry.connections))
            parser = getattr(conn, "parser", None)
            return {
                "traced_bytes_per_connection": sum(
                    s.size_diff for s in after.compare_to(before, "filename")
                )
                / count,
                "top_lines": lines,
                "objects_of_one_connection": {
                    "H1ServerConnection": sys.getsizeof(conn),
                    "slots": slot_sizes(conn),
                    "parser (httptools.HttpRequestParser, None once shrunk)": (
                        sys.getsizeof(parser) if parser is not None else 0
                    ),
                    "transport (uvloop TCPTransport)": sys.getsizeof(conn.transport),
                    "connections open": len(entry.connections),
                },
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
    parser.add_argument("--hold", nargs=2, type=int, metavar=("PORT", "COUNT"), help="internal")
    args = parser.parse_args()
    if args.hold:
        return hold(*args.hold)
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
