"""HTTP/1.1 keep-alive throughput: a backend directly, HAProxy (1 thread), meshproxy (1 worker).

All three target the same backend in the same run, interleaved over several rounds; wrk
reports requests/s and latency percentiles. Results go to bench/results/ as JSON and a
Markdown table. Installs wrk and HAProxy with apt-get when they are missing.

    python bench/http_throughput.py [--rounds 3] [--duration 10] [--connections 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "bench.mesh.test"


def ensure_tools() -> None:
    missing = [
        pkg
        for pkg, binary in (("wrk", "wrk"), ("haproxy", "haproxy"))
        if shutil.which(binary) is None
    ]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def start_backend(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshproxy.demo.backend", "--port", str(port), "--name", "bench"]
    )


def start_haproxy(workdir: Path, port: int, backend: int) -> subprocess.Popen[bytes]:
    config = workdir / "haproxy.cfg"
    config.write_text(f"""global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend web
    bind 127.0.0.1:{port}
    acl bench hdr(host) -i {HOST}
    acl prefix path_beg /bench
    use_backend app if bench prefix
backend app
    server s1 127.0.0.1:{backend}
""")
    return subprocess.Popen(["haproxy", "-f", str(config)])


def start_meshproxy(workdir: Path, port: int, admin: int, backend: int) -> subprocess.Popen[bytes]:
    dynamic = workdir / "dynamic.yaml"
    dynamic.write_text(f"""http:
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
""")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "proxy",
            f"--entryPoints.web.address=127.0.0.1:{port}",
            f"--entryPoints.traefik.address=127.0.0.1:{admin}",
            f"--providers.file.filename={dynamic}",
            "--metrics.prometheus=true",
            "--ping",
            "--log.level=ERROR",
        ]
    )


def run_wrk(port: int, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-H",
            f"Host: {HOST}",
            f"http://127.0.0.1:{port}/bench",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": _latency(out, "50%"),
        "p99_ms": _latency(out, "99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def _latency(out: str, label: str) -> float:
    match = re.search(rf"\s{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    ensure_tools()
    backend_port, haproxy_port = free_port(), free_port()
    mesh_port, admin_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            procs.append(start_backend(backend_port))
            procs.append(start_haproxy(workdir, haproxy_port, backend_port))
            procs.append(start_meshproxy(workdir, mesh_port, admin_port, backend_port))
            for port in (backend_port, haproxy_port, mesh_port):
                wait_port(port)
            time.sleep(0.5)
            targets = {"backend": backend_port, "haproxy": haproxy_port, "meshproxy": mesh_port}
            for port in targets.values():  # warm-up
                run_wrk(port, 2, args.connections)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, port in targets.items():
                    result = run_wrk(port, args.duration, args.connections)
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:10s} {result['rps']:10.0f} req/s  "
                        f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms",
                        flush=True,
                    )
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read()
            assert b"traefik_entrypoint_requests_total" in metrics
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    summary = {
        name: {
            key: statistics.median(r[key] for r in results)
            for key in ("rps", "p50_ms", "p99_ms", "non_2xx")
        }
        for name, results in rounds.items()
    }
    haproxy = summary["haproxy"]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "when": stamp,
        "setup": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "wrk_threads": 1,
            "cpus": os.cpu_count(),
            "router": "Host && PathPrefix",
            "metrics": "on",
            "haproxy_threads": 1,
            "meshproxy_workers": 1,
        },
        "rounds": rounds,
        "median": summary,
        "ratio_to_haproxy": {
            name: {"rps": s["rps"] / haproxy["rps"], "p99": s["p99_ms"] / haproxy["p99_ms"]}
            for name, s in summary.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"http_throughput-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# HTTP/1.1 keep-alive throughput ({stamp})",
        "",
        f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} interleaved rounds, "
        "medians; same backend for all.",
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
    table = "\n".join(lines) + "\n"
    (RESULTS / "http_throughput.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
