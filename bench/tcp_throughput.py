"""Bulk TCP throughput with iperf3 through meshproxy's TCP route, HAProxy `mode tcp` and real
Traefik 3.7, each on one core, in the same run (issue 12: meshproxy >= 1.0x HAProxy, goal
1.4x).

iperf3 (the Debian package; installed with apt-get when missing) runs its server as the
backend; each target is measured once per round with `iperf3 -c -t DURATION -O 1` (one
stream, client to server, the first second omitted: slow start), back to back, so the ratios
to HAProxy are paired per round. The proxies run pinned to CPU 1 (HAProxy `nbthread 1`,
Traefik `GOMAXPROCS=1`, meshproxy one worker), iperf3's client and server on CPU 0; `direct`
(no proxy) shows what the load alone reaches. The CPU time each proxy used per GB relayed is
recorded too. `--with-floor` adds a bare uvloop relay (bench/l4_common.py: what a Python proxy
reading into `bytes` cannot go below).

    python bench/tcp_throughput.py [--rounds 3] [--duration 5] [--reverse] [--no-pin]
                                   [--no-traefik] [--with-floor]

Results: the `tcp_throughput` section of bench/results/tcp.md and
bench/results/tcp_throughput-<when>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LOAD_CPU,
    PINNING,
    PROXY_CPU,
    cpu_seconds,
    free_port,
    pinned,
    start_haproxy_tcp,
    start_meshproxy_l4,
    start_traefik_l4,
    stop_all,
    timestamp,
    wait_routers,
)
from bench.l4_common import paired, run_tcp_floor, save_section, spread


def ensure_iperf3() -> None:
    if shutil.which("iperf3") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "iperf3"], check=True)


def tcp_dynamic(backend: int) -> str:
    """One TCP router `bench` (``HostSNI(`*`)``, no TLS: routed at once) on entrypoint `tcp`
    to `backend` (JSON is YAML)."""
    return json.dumps(
        {
            "tcp": {
                "routers": {
                    "bench": {"entryPoints": ["tcp"], "rule": "HostSNI(`*`)", "service": "app"}
                },
                "services": {
                    "app": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{backend}"}]}}
                },
            }
        }
    )


def iperf3(port: int, duration: int, reverse: bool, pid: int | None) -> dict[str, float]:
    """One iperf3 test to `port`: Gbit/s received, and with `pid` the CPU that process used per
    GB (control connection and omitted second included: an upper bound)."""
    command = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-O", "1", "-J"]
    if reverse:
        command.append("-R")
    before = cpu_seconds(pid) if pid else 0.0
    done = subprocess.run(
        pinned(command, LOAD_CPU), capture_output=True, text=True, timeout=duration + 30
    )
    out = json.loads(done.stdout)
    if "error" in out:
        raise RuntimeError(f"iperf3 to port {port}: {out['error']}")
    received = out["end"]["sum_received"]
    result = {"gbit_s": received["bits_per_second"] / 1e9, "bytes": float(received["bytes"])}
    if pid:
        moved = sum(i["sum"]["bytes"] for i in out["intervals"])  # the omitted second too
        result["cpu_s_per_gb"] = (cpu_seconds(pid) - before) / (moved / 1e9)
    return result


def warm_up(port: int, timeout: float = 30.0) -> None:
    """One 1-second iperf3 test to `port`, retried until it succeeds (the target is listening
    and reaches the iperf3 server). Not a bare connect: iperf3's server takes a connection
    that sends nothing as a failed test and is busy with it for a while."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 through port {port} fails: {done.stdout[-500:]}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per iperf3 test")
    parser.add_argument("--reverse", action="store_true", help="server to client (iperf3 -R)")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--no-traefik", action="store_true")
    parser.add_argument("--with-floor", action="store_true")

    args = parser.parse_args()
    PINNING["on"] = args.pin
    ensure_iperf3()
    from meshproxy.build_info import hot_path_state

    backend, haproxy, mesh, admin = (free_port() for _ in range(4))
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="tcp-bench-") as tmp:
        workdir = Path(tmp)
        try:
            procs.append(
                subprocess.Popen(
                    pinned(["iperf3", "-s", "-p", str(backend)], LOAD_CPU),
                    stdout=subprocess.DEVNULL,
                )
            )
            dynamic = tcp_dynamic(backend)
            ha = start_haproxy_tcp(workdir, haproxy, backend)
            mp = start_meshproxy_l4(workdir, {"tcp": f"127.0.0.1:{mesh}"}, admin, dynamic)
            procs += [ha, mp]
            targets: dict[str, tuple[int, int | None]] = {
                "direct": (backend, None),
                "haproxy": (haproxy, ha.pid),
                "meshproxy": (mesh, mp.pid),
            }
            wait_routers(admin, "tcp", {"bench"})
            if not args.no_traefik:
                traefik, api = free_port(), free_port()
                tr = start_traefik_l4(workdir, {"tcp": f"127.0.0.1:{traefik}"}, api, dynamic)
                procs.append(tr)
                wait_routers(api, "tcp", {"bench"})
                targets["traefik 3.7"] = (traefik, tr.pid)
            if args.with_floor:
                floor = free_port()
                command = [sys.executable, __file__, "--role", "floor", str(floor), str(backend)]
                fl = subprocess.Popen(pinned(command, PROXY_CPU))
                procs.append(fl)
                targets["uvloop floor"] = (floor, fl.pid)
            for port, _ in targets.values():
                warm_up(port)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, (port, pid) in targets.items():
                    result = iperf3(port, args.duration, args.reverse, pid)
                    rounds[name].append(result)
                    cpu = result.get("cpu_s_per_gb")
                    print(
                        f"round {index + 1} {name:14s} {result['gbit_s']:7.2f} Gbit/s"
                        + (f"  {cpu:.3f} CPU s/GB" if cpu else ""),
                        flush=True,
                    )
        finally:
            stop_all(procs)
    stamp = timestamp()
    report: dict[str, Any] = {
        "when": stamp,
        "setup": {
            **vars(args),
            "tool": "iperf3 3.12, 1 stream, -O 1",
            "cpus": PINNING["on"] and "proxy on CPU 1, iperf3 client and server on CPU 0",
            "meshproxy_hot_path": hot_path_state(),
            "haproxy_threads": 1,
            "traefik_gomaxprocs": 1,
        },
        "rounds": rounds,
        "x_haproxy_per_round": {
            n: paired(r, rounds["haproxy"], "gbit_s") for n, r in rounds.items()
        },
    }
    direction = "server to client (-R)" if args.reverse else "client to server"
    lines = [
        f"## Bulk TCP throughput ({stamp}, hot path {hot_path_state()})",
        "",
        f"iperf3, one stream {direction}, {args.duration} s per test (first second omitted), "
        f"{args.rounds} rounds, targets back to back in each round; "
        + (
            "proxies pinned to CPU 1, iperf3 client and server to CPU 0. "
            if args.pin
            else "unpinned. "
        )
        + "Gbit/s and CPU are medians over rounds; `x HAProxy` is the median of the per-round "
        "ratios (min-max over rounds in brackets).",
        "",
        "| target | Gbit/s | x HAProxy (same round) | proxy CPU s per GB |",
        "|---|---:|---:|---:|",
    ]
    for name, results in rounds.items():
        rate = statistics.median(r["gbit_s"] for r in results)
        ratio = spread(report["x_haproxy_per_round"][name])
        cpu = (
            f"{statistics.median(r['cpu_s_per_gb'] for r in results):.3f}"
            if "cpu_s_per_gb" in results[0]
            else "-"
        )
        lines.append(f"| {name} | {rate:.2f} | {ratio} | {cpu} |")
    save_section("tcp", "tcp_throughput", report, lines)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        run_tcp_floor(int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(main())
