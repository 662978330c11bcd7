"""HTTP/1.1 keep-alive throughput: a backend directly, HAProxy (1 thread), meshproxy (1 worker).

All three target the same backend in the same run, interleaved over several rounds; wrk
reports requests/s and latency percentiles. Results go to bench/results/ as JSON and a
Markdown table. Installs wrk and HAProxy with apt-get when they are missing.

The ratios to HAProxy are medians of per-round ratios: each round measures HAProxy and
meshproxy back to back, so a shared VM's drift (often tens of percent between rounds) cancels
out of each pair. By default the proxy under test runs alone on CPU 1 (HAProxy and meshproxy
alike) while wrk and the backend share CPU 0; `--no-pin` lets the scheduler place everything.

    python bench/http_throughput.py [--rounds 5] [--duration 8] [--connections 50] [--no-pin]
                                    [--with-floor]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    PINNING,
    PROXY_CPU,
    check_metrics,
    ensure_tools,
    free_port,
    medians,
    pinned,
    print_round,
    run_wrk,
    save_report,
    start_backend,
    start_haproxy_for,
    start_meshproxy,
    stop_all,
    timestamp,
    wait_port,
    wrk_setup,
)

HOST = "bench.mesh.test"


def start_haproxy(workdir: Path, port: int, backend: int) -> subprocess.Popen[bytes]:
    return start_haproxy_for(workdir, port, backend, HOST)


def start_meshproxy_bench(
    workdir: Path, port: int, admin: int, backend: int
) -> subprocess.Popen[bytes]:
    return start_meshproxy(
        workdir,
        port,
        admin,
        f"""http:
  routers:
    bench:
      entryPoints: [web]
      rule: Host(`{HOST}`) && PathPrefix(`/bench`)
      service: app
  services:
    app:
      loadBalancer:
        servers:
          - url: http://127.0.0.1:{backend}
""",
    )


def start_floor(port: int, backend: int) -> subprocess.Popen[bytes]:
    """bench/minimal_relay.py: the cost of Python + uvloop + httptools alone."""
    relay = Path(__file__).resolve().parent / "minimal_relay.py"
    command = [sys.executable, str(relay), "--port", str(port), "--upstream-port", str(backend)]
    return subprocess.Popen(pinned(command, PROXY_CPU))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin (default: proxies on CPU 1, wrk and the backend on CPU 0)",
    )
    parser.add_argument(
        "--with-floor",
        action="store_true",
        help="also measure bench/minimal_relay.py (a bare uvloop + httptools relay)",
    )
    args = parser.parse_args()
    PINNING["on"] = args.pin
    ensure_tools()
    backend_port, haproxy_port = free_port(), free_port()
    mesh_port, admin_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            procs.append(start_backend(backend_port))
            procs.append(start_haproxy(workdir, haproxy_port, backend_port))
            procs.append(start_meshproxy_bench(workdir, mesh_port, admin_port, backend_port))
            targets = {"backend": backend_port, "haproxy": haproxy_port, "meshproxy": mesh_port}
            if args.with_floor:
                targets["python-floor"] = free_port()
                procs.append(start_floor(targets["python-floor"], backend_port))
            for port in targets.values():
                wait_port(port)
            time.sleep(0.5)
            for port in targets.values():  # warm-up
                run_wrk(port, 2, args.connections, HOST)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, port in targets.items():
                    result = run_wrk(port, args.duration, args.connections, HOST)
                    rounds[name].append(result)
                    print_round(index, name, result)
            check_metrics(admin_port)
        finally:
            stop_all(procs)
    summary = medians(rounds, ("rps", "p50_ms", "p99_ms", "non_2xx"))
    paired = {
        name: {
            key: statistics.median(
                r[metric] / h[metric] for r, h in zip(results, rounds["haproxy"], strict=True)
            )
            for key, metric in (("rps", "rps"), ("p99", "p99_ms"))
        }
        for name, results in rounds.items()
    }
    stamp = timestamp()
    report = {
        "when": stamp,
        "setup": {
            **wrk_setup(args),
            "router": "Host && PathPrefix",
            "metrics": "on",
            "haproxy_threads": 1,
            "python_floor": args.with_floor,
        },
        "rounds": rounds,
        "median": summary,
        "ratio_to_haproxy": paired,
        "ratio_to_haproxy_per_round": {
            name: [r["rps"] / h["rps"] for r, h in zip(results, rounds["haproxy"], strict=True)]
            for name, results in rounds.items()
        },
    }
    lines = [
        f"# HTTP/1.1 keep-alive throughput ({stamp})",
        "",
        f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} interleaved rounds, "
        "same backend for all; "
        + ("proxies pinned to CPU 1, wrk and backend to CPU 0. " if args.pin else "unpinned. ")
        + "req/s and latencies are medians over rounds; ratios are medians of per-round ratios.",
        "",
        "| target | req/s | p50 ms | p99 ms | req/s vs HAProxy | p99 vs HAProxy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        ratio = report["ratio_to_haproxy"][name]
        lines.append(
            f"| {name} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{ratio['rps']:.2f}x | {ratio['p99']:.2f}x |"
        )
    save_report("http_throughput", report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
