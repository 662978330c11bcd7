"""HTTP/1.1 keep-alive throughput and CPU per request: a backend directly, HAProxy (1 thread),
meshproxy (1 worker), and optionally a bare Python relay, meshproxy with 2 workers and
meshproxy variants from other source trees, all in the same run.

All target the same backend, interleaved over several rounds; wrk reports requests/s and
latency percentiles, /proc the proxy's CPU time (user + system; for 2 workers the supervisor
and its workers, `tree_cpu_seconds`), divided by the requests wrk completed: CPU us per
request, the figure that stays put while a shared VM's rates drift. Results go to
bench/results/ as JSON and a Markdown table. Installs wrk and HAProxy with apt-get when they
are missing.

The ratios to HAProxy are medians of per-round ratios: each round measures HAProxy and
meshproxy back to back, so a shared VM's drift (often tens of percent between rounds) cancels
out of each pair. By default each proxy runs alone on CPU 1 while wrk and the backend share
CPU 0; `--no-pin` lets the scheduler place everything. meshproxy with 2 workers
(`--two-workers`) is never pinned (it needs both CPUs): compare it with the others by CPU per
request, not by rate; its scaling figure is 2 x (CPU/req with 1 worker) / (CPU/req with 2),
2.0 being perfect.

`--rate N`: instead of wrk's closed loop (as fast as each target answers), h2load --h1 offers
N req/s over the same connections (N/connections each): every target then runs in the same
regime (an event loop's CPU per request depends on how many events each wake-up brings, so a
saturated proxy pays less per request than one at half load), which makes CPU per request
comparable across targets and across worker counts. Keep N below what the slowest target
serves.

`--variant NAME=DIR[:KEY=VALUE...]` adds `meshproxy@NAME`: meshproxy run from the source tree
DIR (with DIR/.venv/bin/python when there is one, e.g. a compiled clone at another commit),
with extra environment variables: before/after figures from one run.

    python bench/http_throughput.py [--rounds 5] [--duration 8] [--connections 50] [--no-pin]
                                    [--with-floor] [--two-workers] [--variant NAME=DIR ...]
                                    [--rate N] [--tag TAG]
"""

from __future__ import annotations

import argparse
import math
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
    cpu_seconds,
    ensure_h2load,
    ensure_tools,
    free_port,
    parse_variants,
    pinned,
    run_h2load,
    run_wrk,
    save_report,
    start_backend,
    start_haproxy_for,
    start_meshproxy,
    timestamp,
    tree_cpu_seconds,
    wait_port,
    wrk_setup,
)

HOST = "bench.mesh.test"


def start_haproxy(workdir: Path, port: int, backend: int) -> subprocess.Popen[bytes]:
    return start_haproxy_for(workdir, port, backend, HOST)


def dynamic_config(backend: int) -> str:
    return f"""http:
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
"""


def start_meshproxy_bench(
    workdir: Path,
    port: int,
    admin: int,
    backend: int,
    workers: int = 1,
    source: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """meshproxy with `workers` workers (1: one process, no supervisor, pinned), metrics on;
    from the tree `source` (its own .venv's Python if it has one) when given."""
    return start_meshproxy(
        workdir,
        port,
        admin,
        dynamic_config(backend),
        source,
        env,
        workers=workers,
        pin=workers == 1,
        own_venv=True,
    )


def start_floor(port: int, backend: int) -> subprocess.Popen[bytes]:
    """bench/minimal_relay.py: the cost of Python + uvloop + httptools alone."""
    relay = Path(__file__).resolve().parent / "minimal_relay.py"
    command = [sys.executable, str(relay), "--port", str(port), "--upstream-port", str(backend)]
    return subprocess.Popen(pinned(command, PROXY_CPU))


def load(port: int, args: argparse.Namespace) -> dict[str, float]:
    """One measurement: wrk (closed loop) or, with --rate, h2load at a fixed rate."""
    if not args.rate:
        return run_wrk(port, args.duration, args.connections, HOST)
    out = run_h2load(
        f"http://127.0.0.1:{port}/bench",
        args.duration,
        args.connections,
        1,
        (f":authority: {HOST}",),
        extra=("--h1", f"--rps={max(1, args.rate // args.connections)}"),
    )
    out["non_2xx"] = out["requests"] - out["status_2xx"]
    return out


def paired(
    rounds: dict[str, list[dict[str, float]]], name: str, key: str, invert: bool = False
) -> tuple[float, float, float]:
    """(median, min, max) over rounds of `name`'s `key` / HAProxy's (HAProxy's / `name`'s with
    `invert`: for CPU per request, so that higher is better as for req/s)."""
    ratios = []
    for r, h in zip(rounds[name], rounds["haproxy"], strict=True):
        a, b = (h[key], r[key]) if invert else (r[key], h[key])
        if b and not math.isnan(a) and not math.isnan(b):
            ratios.append(a / b)
    if not ratios:
        return (math.nan, math.nan, math.nan)
    return (statistics.median(ratios), min(ratios), max(ratios))


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
    parser.add_argument(
        "--two-workers",
        action="store_true",
        help="also measure meshproxy with 2 workers (never pinned)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR[:KEY=VALUE...]",
        help="also measure meshproxy from source tree DIR (see above)",
    )
    parser.add_argument(
        "--rate", type=int, default=0, help="offer this many req/s with h2load (see above)"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    args = parser.parse_args()
    PINNING["on"] = args.pin
    ensure_tools()
    if args.rate:
        ensure_h2load()
    backend_port, haproxy_port = free_port(), free_port()
    mesh_port, admin_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    pids: dict[str, int] = {}
    admins = [admin_port]
    variants = parse_variants(args.variant)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            procs.append(start_backend(backend_port))
            pids["backend"] = procs[-1].pid
            procs.append(start_haproxy(workdir, haproxy_port, backend_port))
            pids["haproxy"] = procs[-1].pid
            procs.append(start_meshproxy_bench(workdir, mesh_port, admin_port, backend_port))
            pids["meshproxy"] = procs[-1].pid
            targets = {"backend": backend_port, "haproxy": haproxy_port, "meshproxy": mesh_port}
            for name, (source, env) in variants.items():
                port, admin = free_port(), free_port()
                procs.append(
                    start_meshproxy_bench(workdir, port, admin, backend_port, 1, source, env)
                )
                targets[name], pids[name] = port, procs[-1].pid
                admins.append(admin)
            if args.two_workers:
                port, admin = free_port(), free_port()
                procs.append(start_meshproxy_bench(workdir, port, admin, backend_port, 2))
                targets["meshproxy-w2"], pids["meshproxy-w2"] = port, procs[-1].pid
                admins.append(admin)
            if args.with_floor:
                targets["python-floor"] = free_port()
                procs.append(start_floor(targets["python-floor"], backend_port))
                pids["python-floor"] = procs[-1].pid
            for port in targets.values():
                wait_port(port)
            time.sleep(1.0)
            for port in targets.values():  # warm-up
                run_wrk(port, 2, args.connections, HOST)
            time.sleep(1.0)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, port in targets.items():
                    pid = pids.get(name)
                    before = tree_cpu_seconds(pid) if pid else 0.0
                    top_before = cpu_seconds(pid) if pid else 0.0  # a supervisor alone
                    result = load(port, args)
                    cpu = tree_cpu_seconds(pid) - before if pid else math.nan
                    top = cpu_seconds(pid) - top_before if pid else math.nan
                    done = result["requests"]
                    result["cpu_us_per_req"] = cpu / done * 1e6 if done else math.nan
                    result["top_cpu_us_per_req"] = top / done * 1e6 if done else math.nan
                    result["cpu_util"] = cpu / args.duration
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:24s} {result['rps']:9.0f} req/s  "
                        f"p99 {result['p99_ms']:6.2f} ms  "
                        f"CPU {result['cpu_us_per_req']:6.1f} us/req "
                        f"({result['cpu_util']:.2f} CPU)",
                        flush=True,
                    )
            for admin in admins:
                check_metrics(admin)
        finally:
            stop_all_quietly(procs)
    keys = ("rps", "p50_ms", "p99_ms", "non_2xx", "cpu_us_per_req", "top_cpu_us_per_req")
    keys += ("cpu_util",)
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in keys}
        | {
            "cpu_us_per_req_min": min(r["cpu_us_per_req"] for r in results),
            "cpu_us_per_req_max": max(r["cpu_us_per_req"] for r in results),
        }
        for name, results in rounds.items()
    }
    ratios = {
        name: {
            "rps": paired(rounds, name, "rps"),
            "p99": paired(rounds, name, "p99_ms"),
            "cpu_per_req": paired(rounds, name, "cpu_us_per_req", invert=True),
        }
        for name in rounds
    }
    scaling = None
    if args.two_workers:
        values = [
            2 * w1["cpu_us_per_req"] / w2["cpu_us_per_req"]
            for w1, w2 in zip(rounds["meshproxy"], rounds["meshproxy-w2"], strict=True)
        ]
        scaling = (statistics.median(values), min(values), max(values))
    stamp = timestamp()
    report = {
        "when": stamp,
        "setup": {
            **wrk_setup(args),
            "router": "Host && PathPrefix",
            "metrics": "on",
            "haproxy_threads": 1,
            "python_floor": args.with_floor,
            "two_workers": args.two_workers,
            "offered_rate": args.rate or None,
            "variants": {name: str(source) for name, (source, _) in variants.items()},
        },
        "rounds": rounds,
        "median": summary,
        "ratio_to_haproxy": ratios,
        "scaling_1_to_2_workers_cpu_terms": scaling,
    }
    lines = [
        f"# HTTP/1.1 keep-alive throughput and CPU per request ({stamp})",
        "",
        (
            f"h2load --h1 -c{args.connections} at {args.rate} req/s offered"
            if args.rate
            else f"wrk -t1 -c{args.connections}"
        )
        + f" for {args.duration} s, {args.rounds} interleaved rounds, "
        "same backend for all; "
        + ("proxies pinned to CPU 1, wrk and backend to CPU 0" if args.pin else "unpinned")
        + (" (meshproxy-w2 never pinned)" if args.two_workers else "")
        + f"; meshproxy hot path {report['setup']['meshproxy_hot_path']}. "
        "req/s, latencies and CPU are medians over rounds (CPU range min-max in brackets); "
        "ratios are medians of per-round ratios to HAProxy (range in brackets). CPU us/req: "
        "the target process's user + system time from /proc over the requests the load "
        "generator completed (for the backend row: the backend's own).",
        "",
        "| target | req/s | p50 ms | p99 ms | CPU us/req | req/s vs HAProxy | "
        "CPU/req: HAProxy's / this |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        rps, cpu = ratios[name]["rps"], ratios[name]["cpu_per_req"]
        lines.append(
            f"| {name} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['cpu_us_per_req']:.1f} ({s['cpu_us_per_req_min']:.1f}-"
            f"{s['cpu_us_per_req_max']:.1f}) | {rps[0]:.2f}x ({rps[1]:.2f}-{rps[2]:.2f}) | "
            f"{cpu[0]:.2f}x ({cpu[1]:.2f}-{cpu[2]:.2f}) |"
        )
    if scaling is not None:
        lines += [
            "",
            f"1 -> 2 workers in CPU terms (2 x CPU/req with 1 worker / with 2): "
            f"**{scaling[0]:.2f}x** ({scaling[1]:.2f}-{scaling[2]:.2f}); target >= 1.7x. "
            "Of meshproxy-w2's CPU per request, its supervisor's own: "
            f"{summary['meshproxy-w2']['top_cpu_us_per_req']:.2f} us.",
        ]
    save_report("http_throughput" + (f"-{args.tag}" if args.tag else ""), report, lines)
    return 0


def stop_all_quietly(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    raise SystemExit(main())
