"""Memory after many requests: a proxy's RSS after 20,000 and after 200,000 keep-alive requests.

A proxy that gives back what each request allocated stays flat between the two readings; one
that leaks a few objects per request (meshproxy compiled with mypyc 1.13: 3 per proxied
request) grows by megabytes (issue 9 item 1). meshproxy (1 worker, metrics on) and, when it is
installed, HAProxy (1 thread) proxy the same demo backend over loopback; the load is exactly N
GETs over `--connections` keep-alive connections (one in flight on each), bounded in time.
RSS is read from /proc after a warm-up, after `--first` requests and after `--second`
(cumulative). Results go to bench/results/rss-<when>.json and bench/results/rss.md.

    python bench/rss.py [--first 20000] [--second 200000] [--connections 20] [--no-haproxy]
                        [--workers 1]

With `--workers 2` meshproxy's supervisor and workers are summed (RSS; see
bench/idle_connections.py `tree_memory`). The longer test of the same thing, under mixed
HTTP/1.1, h2c and new-connection load for minutes, is bench/soak.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    bench_dynamic,
    free_port,
    keepalive_requests,
    save_report,
    start_backend,
    start_haproxy_for,
    stop_all,
    timestamp,
    wait_port,
)
from idle_connections import start_meshproxy_workers, tree_memory, wait_ping

HOST = "bench.mesh.test"
WARM_UP = 2_000
RATE_FLOOR = 1_000  # requests/s below which a run counts as stuck: bounds every phase in time


def rss_bytes(pid: int) -> int:
    """RSS of `pid` and its descendants (a supervisor's workers), bytes."""
    return tree_memory(pid)["rss"]


def measure(port: int, pid: int, first: int, second: int, connections: int) -> dict[str, Any]:
    """RSS of `pid` after the warm-up, after `first` and after `second` requests in total."""

    def load(requests: int) -> None:
        statuses = keepalive_requests(
            port, HOST, requests, connections, timeout=10 + requests / RATE_FLOOR
        )
        assert statuses == {200: requests}, statuses

    load(WARM_UP)
    time.sleep(0.5)  # let the proxy settle (deferred frees, idle sweeps)
    readings = {"warm_up": rss_bytes(pid)}
    load(first - WARM_UP)
    time.sleep(0.5)
    readings["first"] = rss_bytes(pid)
    started = time.monotonic()
    load(second - first)
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    readings["second"] = rss_bytes(pid)
    grown = readings["second"] - readings["first"]
    return {
        "rss_bytes": readings,
        "growth_bytes": grown,
        "growth_bytes_per_1000_requests": grown * 1000 / (second - first),
        "requests_per_second_second_phase": (second - first) / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first", type=int, default=20_000)
    parser.add_argument("--second", type=int, default=200_000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--no-haproxy", dest="haproxy", action="store_false")
    parser.add_argument("--workers", type=int, default=1, help="meshproxy --workers")
    args = parser.parse_args()
    assert WARM_UP < args.first < args.second
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
            dynamic = bench_dynamic(backend, HOST)
            mesh = start_meshproxy_workers(workdir, port, admin, dynamic, args.workers)
            procs.append(mesh)
            wait_port(port)
            wait_ping(admin)
            results["meshproxy"] = measure(
                port, mesh.pid, args.first, args.second, args.connections
            )
            if args.haproxy and shutil.which("haproxy"):
                port = free_port()
                haproxy = start_haproxy_for(workdir, port, backend, HOST)
                procs.append(haproxy)
                wait_port(port)
                results["haproxy"] = measure(
                    port, haproxy.pid, args.first, args.second, args.connections
                )
        finally:
            stop_all(procs)
    report = {
        "when": timestamp(),
        "setup": {
            "first_requests": args.first,
            "second_requests": args.second,
            "connections": args.connections,
            "warm_up_requests": WARM_UP,
            "meshproxy_workers": args.workers,
            "meshproxy_hot_path": hot_path_state(),
        },
        "results": results,
    }
    mib = 1024 * 1024
    lines = [
        f"# RSS after {args.first:,} and {args.second:,} keep-alive requests ({report['when']})",
        "",
        f"{args.connections} keep-alive connections, one request in flight on each, loopback, "
        f"same demo backend; meshproxy --workers={args.workers}, hot path: {hot_path_state()}.",
        "",
        "| proxy | RSS after warm-up MiB | after first MiB | after second MiB "
        "| growth MiB | bytes per 1,000 requests |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        rss = result["rss_bytes"]
        lines.append(
            f"| {name} | {rss['warm_up'] / mib:.1f} | {rss['first'] / mib:.1f} "
            f"| {rss['second'] / mib:.1f} | {result['growth_bytes'] / mib:+.2f} "
            f"| {result['growth_bytes_per_1000_requests']:.0f} |"
        )
    save_report("rss", report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
