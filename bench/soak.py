"""Memory soak: meshproxy's RSS under steady mixed load for a bounded time (issue 15 item 4).

meshproxy (`--workers`, default 1; with 2 the supervisor and its workers are summed) proxies
the demo backend over loopback while three load generators run for the whole soak at a fixed
rate, each in its own process:

- HTTP/1.1 keep-alive: h2load --h1, `--h1-clients` connections at `--rate` requests/s each;
- h2c (prior knowledge): h2load, `--h2-clients` connections, 4 streams, `--rate` req/s each;
- a new connection per request: this script (`--new-connections`), one GET with
  `Connection: close` per connection, `--new-rate` per second.

Every `--every` seconds the proxy's RSS (and PSS) is read from /proc. The first `--warm-up`
minutes are left out of the fit (pools, caches, allocator arenas fill then); over the rest a
least-squares slope in MB/min and the spread (max - min) say whether memory is flat. The
load is bounded in time (h2load -D, the connection loop's own deadline); a generator that
fails is reported, not retried. Results: bench/results/soak-<when>.json, bench/results/soak.md.

    python bench/soak.py [--minutes 10] [--every 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    bench_dynamic,
    ensure_h2load,
    free_port,
    save_report,
    start_backend,
    stop_all,
    timestamp,
    wait_port,
)
from idle_connections import start_meshproxy_workers, tree_memory, wait_ping

HOST = "bench.mesh.test"
MB = 1_000_000


def new_connections(port: int, rate: float, seconds: float) -> int:
    """Child process: one GET per new connection at `rate` per second for `seconds`; prints
    the counts of answered and failed connections as `ok N failed M`."""
    request = f"GET /bench HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    ok = failed = 0
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < seconds:
        if sent > elapsed * rate:
            time.sleep(min(0.05, sent / rate - elapsed))
            continue
        sent += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            ok += answer.startswith(b"HTTP/1.1 200")
            failed += not answer.startswith(b"HTTP/1.1 200")
        except OSError:
            failed += 1
    print(f"ok {ok} failed {failed}", flush=True)
    return 0


def slope_and_spread(samples: list[tuple[float, int]]) -> dict[str, float]:
    """Least-squares slope (MB per minute) and spread (MB) of (seconds, bytes) samples."""
    times = [t / 60 for t, _ in samples]
    values = [v / MB for _, v in samples]
    if len(samples) < 2:
        return {"slope_mb_per_min": float("nan"), "spread_mb": 0.0, "samples": len(samples)}
    slope = statistics.linear_regression(times, values).slope
    return {
        "slope_mb_per_min": slope,
        "spread_mb": max(values) - min(values),
        "first_mb": values[0],
        "last_mb": values[-1],
        "samples": len(samples),
    }


def h2load_counts(out: str) -> dict[str, int]:
    found = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored",
        out,
    )
    if found is None:
        return {"unparsed": 1}
    return {"done": int(found.group(3)), "succeeded": int(found.group(4)),
            "failed": int(found.group(5)), "errored": int(found.group(6))}  # fmt: skip


def soak(args: argparse.Namespace) -> int:
    ensure_h2load()
    seconds = max(1, round(args.minutes * 60))
    procs: list[subprocess.Popen[bytes]] = []
    samples: list[dict[str, float]] = []
    loads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backend, port, admin = free_port(), free_port(), free_port()
        try:
            procs.append(start_backend(backend))
            wait_port(backend)
            mesh = start_meshproxy_workers(
                Path(tmp), port, admin, bench_dynamic(backend, HOST), args.workers, args.source
            )
            procs.append(mesh)
            wait_port(port)
            wait_ping(admin)
            url = f"http://127.0.0.1:{port}/bench"
            common = ["-t1", f"-D{seconds}", f"--rps={args.rate}"]
            generators = {
                "http1_keepalive": ["h2load", "--h1", f"-c{args.h1_clients}", "-m1", *common,
                                    "-H", f":authority: {HOST}", url],
                "h2c": ["h2load", f"-c{args.h2_clients}", "-m4", *common,
                        "-H", f":authority: {HOST}", url],
                "new_connections": [sys.executable, __file__, "--new-connections", str(port),
                                    str(args.new_rate), str(seconds)],
            }  # fmt: skip
            wanted = {
                "http1_keepalive": args.h1_clients > 0,
                "h2c": args.h2_clients > 0,
                "new_connections": args.new_rate > 0,
            }  # a zero turns that load off: to tell which one memory follows
            started = time.monotonic()
            running = {
                name: subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                for name, cmd in generators.items()
                if wanted[name]
            }
            deadline = started + seconds
            # samples only while the load runs: once h2load ends its connections close and
            # what they held is given back (a sample then is not steady state)
            while (now := time.monotonic()) < deadline - 0.5:
                memory = tree_memory(mesh.pid)
                samples.append({"t": now - started, **memory})
                print(
                    f"{now - started:6.0f} s  RSS {memory['rss'] / MB:7.2f} MB  "
                    f"PSS {memory['pss'] / MB:7.2f} MB",
                    flush=True,
                )
                time.sleep(min(args.every, max(0.0, deadline - 0.5 - time.monotonic())))
                if all(p.poll() is not None for p in running.values()):
                    break
            for name, proc in running.items():
                out, _ = proc.communicate(timeout=seconds + 60)
                if name == "new_connections":
                    found = re.search(r"ok (\d+) failed (\d+)", out or "")
                    loads[name] = (
                        {"succeeded": int(found.group(1)), "failed": int(found.group(2))}
                        if found
                        else {"unparsed": 1}
                    )
                else:
                    loads[name] = h2load_counts(out or "")
                loads[name]["exit"] = proc.returncode
        finally:
            stop_all(procs)
    steady = [s for s in samples if s["t"] >= args.warm_up * 60]
    fit = {key: slope_and_spread([(s["t"], int(s[key])) for s in steady]) for key in ("rss", "pss")}
    whole = slope_and_spread([(s["t"], int(s["rss"])) for s in samples])
    report = {
        "when": timestamp(),
        "setup": {
            "minutes": args.minutes,
            "sample_every_s": args.every,
            "warm_up_minutes_left_out_of_fit": args.warm_up,
            "meshproxy_workers": args.workers,
            "meshproxy_source": str(args.source or "the working tree"),
            "http1_keepalive": f"{args.h1_clients} connections x {args.rate} req/s",
            "h2c": f"{args.h2_clients} connections x 4 streams, {args.rate} req/s per connection",
            "new_connections_per_s": args.new_rate,
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "note": "shared 2-core VM, other benchmarks and test runs beside it",
        },
        "load": loads,
        "fit_after_warm_up": fit,
        "fit_whole_run_rss": whole,
        "samples": samples,
    }
    rss, pss = fit["rss"], fit["pss"]
    total = {k: sum(v.get(k, 0) for v in loads.values()) for k in ("succeeded", "failed")}
    lines = [
        f"# Memory soak ({report['when']})",
        "",
        f"meshproxy --workers={args.workers}, {args.minutes:g} min of steady load: HTTP/1.1 "
        f"keep-alive {args.h1_clients} x {args.rate} req/s, h2c {args.h2_clients} x "
        f"{args.rate} req/s, {args.new_rate} new connections/s; RSS read every {args.every:g} s; "
        f"the first {args.warm_up:g} min left out of the fit. Shared, loaded 2-core VM "
        f"(load average at the end {os.getloadavg()[0]:.1f}).",
        "",
        "| measure | slope MB/min | spread MB | first MB | last MB | samples |",
        "|---|---:|---:|---:|---:|---:|",
        f"| RSS | {rss['slope_mb_per_min']:+.4f} | {rss['spread_mb']:.2f} "
        f"| {rss.get('first_mb', 0):.2f} | {rss.get('last_mb', 0):.2f} | {rss['samples']} |",
        f"| PSS | {pss['slope_mb_per_min']:+.4f} | {pss['spread_mb']:.2f} "
        f"| {pss.get('first_mb', 0):.2f} | {pss.get('last_mb', 0):.2f} | {pss['samples']} |",
        f"| RSS, whole run | {whole['slope_mb_per_min']:+.4f} | {whole['spread_mb']:.2f} "
        f"| {whole.get('first_mb', 0):.2f} | {whole.get('last_mb', 0):.2f} "
        f"| {whole['samples']} |",
        "",
        f"Requests: {total['succeeded']:,} succeeded, {total['failed']:,} failed "
        f"({', '.join(f'{k}: {v}' for k, v in loads.items())}).",
    ]
    save_report(f"soak-w{args.workers}{args.tag}", report, lines)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warm-up", type=float, default=1.0, help="minutes left out of the fit")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=int, default=100, help="req/s per h2load connection")
    parser.add_argument("--h1-clients", type=int, default=6)
    parser.add_argument("--h2-clients", type=int, default=3)
    parser.add_argument("--new-rate", type=float, default=50.0)
    parser.add_argument(
        "--source", type=Path, default=None, help="run meshproxy from this source tree"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--new-connections", nargs=3, metavar=("PORT", "RATE", "SECONDS"))
    args = parser.parse_args()
    if args.new_connections:
        port, rate, secs = args.new_connections
        return new_connections(int(port), float(rate), float(secs))
    return soak(args)


if __name__ == "__main__":
    raise SystemExit(main())
