"""UDP datagrams per second: direct to an echo server, and through meshproxy, real Traefik 3.7
(one core, GOMAXPROCS=1) and a bare uvloop relay (the floor of any Python UDP proxy: one
connected socket per client, no routing, no timeout, no caps, no metrics), in the same run.

Load: a closed loop of `--sessions` client sockets (each one a proxy session), each keeping
`--window` datagrams of `--size` bytes in flight; a reply sends the next datagram. A session
with no reply for 50 ms lost its datagrams (a socket buffer overflowed on the way) and sends
its window again (counted), so losses do not shrink the load for the rest of the run. Every
target is measured once per round, back to back, and ratios to direct are paired per round
(a shared VM drifts between rounds far more than between two measurements). The CPU time each
proxy used per relayed round trip (request + reply) is recorded too, and the echo server's for
`direct`: `CPU x direct` (echo's CPU per round trip / the proxy's, paired per round) is the
proxy's capacity per core against the echo server's, which scheduling on a shared machine
disturbs far less than the rates (the proxies are rarely CPU-bound here).

    python bench/udp_datagrams.py [--rounds 3] [--duration 5] [--sessions 32] [--window 4]
                                  [--size 100] [--no-pin] [--no-traefik]

Results: bench/results/udp_datagrams-<when>.json and the `udp_datagrams` section of
bench/results/udp.md. Issue 12's target:
meshproxy >= 0.5x direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LOAD_CPU,
    PINNING,
    PROXY_CPU,
    cpu_seconds,
    free_port,
    paired_ratio,
    pinned,
    stop_all,
    timestamp,
    traefik_binary,
)
from bench.l4_common import paired, save_section, spread

# ------------------------------------------------------------------ roles run as subprocesses


def run_echo(port: int) -> None:
    import uvloop

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", port))
        await asyncio.Event().wait()

    uvloop.run(main())


def run_floor(port: int, upstream: int) -> None:
    """The bare relay: what a Python UDP proxy on uvloop cannot go below."""
    import uvloop

    class Up(asyncio.DatagramProtocol):
        def __init__(self, listener: Any, client: Any) -> None:
            self.listener, self.client = listener, client

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.listener.sendto(data, self.client)

    class Listener(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.sessions: dict[Any, list[Any]] = {}

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            session = self.sessions.get(addr)
            if session is None:
                session = self.sessions[addr] = [None, [data]]
                asyncio.get_running_loop().create_task(self.open(addr, session))
            elif session[0] is None:
                session[1].append(data)
            else:
                session[0].sendto(data)

        async def open(self, addr: Any, session: list[Any]) -> None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Up(self.transport, addr), remote_addr=("127.0.0.1", upstream)
            )
            session[0] = transport
            for data in session[1]:
                transport.sendto(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Listener, local_addr=("127.0.0.1", port))
        await asyncio.Event().wait()

    uvloop.run(main())


def run_load(port: int, sessions: int, window: int, size: int, duration: float) -> None:
    """Prints {"replies": n, "seconds": s} for the measured span (after a 0.5 s warm-up)."""
    import uvloop

    class Client(asyncio.DatagramProtocol):
        def __init__(self, state: list[Any]) -> None:
            self.state = state
            self.received = self.seen = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.refill()

        def refill(self) -> None:
            for _ in range(window):
                self.transport.sendto(b"x" * size)  # type: ignore[attr-defined]

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.state[0] += 1
            self.received += 1
            if not self.state[1]:
                self.transport.sendto(data)  # type: ignore[attr-defined]

        def stalled(self) -> bool:
            """No reply since the last look: its datagrams in flight were dropped (a socket
            buffer overflowed on the way); the window is sent again so a loss does not shrink
            the load for the rest of the run."""
            stalled, self.seen = self.received == self.seen, self.received
            return stalled

    async def main() -> None:
        loop = asyncio.get_running_loop()
        state: list[Any] = [0, False]
        clients = []
        for _ in range(sessions):
            _, client = await loop.create_datagram_endpoint(
                lambda: Client(state), remote_addr=("127.0.0.1", port)
            )
            clients.append(client)
        refills = 0

        async def watch() -> None:
            nonlocal refills
            while not state[1]:
                await asyncio.sleep(0.05)
                for client in clients:
                    if client.stalled() and not state[1]:
                        refills += 1
                        client.refill()

        watcher = loop.create_task(watch())
        await asyncio.sleep(0.5)  # warm-up: sessions opened on the proxy
        start, began, refills_before = state[0], time.perf_counter(), refills
        await asyncio.sleep(duration)
        replies, seconds = state[0] - start, time.perf_counter() - began
        state[1] = True
        await watcher
        lost = refills - refills_before
        print(json.dumps({"replies": replies, "seconds": seconds, "refills": lost}))

    uvloop.run(main())


# ------------------------------------------------------------------ the benchmark


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def role(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", *args]


def udp_dynamic(backend: int) -> str:
    """One UDP router `bench` on entrypoint `udp` to the echo server (JSON is YAML)."""
    return json.dumps(
        {
            "udp": {
                "routers": {"bench": {"entryPoints": ["udp"], "service": "echo"}},
                "services": {
                    "echo": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{backend}"}]}}
                },
            }
        }
    )


def wait_http(url: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if check(answer.read()):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def start_meshproxy(workdir: Path, port: int, admin: int, dynamic: str) -> Any:
    path = workdir / "meshproxy.yaml"
    path.write_text(dynamic)
    proc = subprocess.Popen(
        pinned(
            [
                sys.executable,
                "-m",
                "meshproxy",
                "proxy",
                "--workers=1",  # one process, whose CPU time is measured
                f"--entryPoints.udp.address=127.0.0.1:{port}/udp",
                f"--entryPoints.traefik.address=127.0.0.1:{admin}",
                f"--providers.file.filename={path}",
                "--metrics.prometheus=true",
                "--api.insecure",
                "--log.level=ERROR",
            ],
            PROXY_CPU,
        )
    )
    wait_http(
        f"http://127.0.0.1:{admin}/api/rawdata",
        lambda body: "bench@file" in json.loads(body).get("udpRouters", {}),
    )
    return proc


def start_traefik(workdir: Path, port: int, api: int, dynamic: str) -> Any:
    path = workdir / "dynamic-traefik.yaml"  # not traefik.yaml: its static config's name
    path.write_text(dynamic)
    proc = subprocess.Popen(
        pinned(
            [
                traefik_binary(),
                f"--entryPoints.udp.address=127.0.0.1:{port}/udp",
                f"--entryPoints.traefik.address=127.0.0.1:{api}",
                "--api.insecure=true",
                f"--providers.file.filename={path}",
                "--log.level=ERROR",
                "--global.checkNewVersion=false",
                "--global.sendAnonymousUsage=false",
            ],
            PROXY_CPU,
        ),
        env={**os.environ, "GOMAXPROCS": "1"},
        cwd=workdir,
    )
    wait_http(
        f"http://127.0.0.1:{api}/api/udp/routers",
        lambda body: any(r["name"].startswith("bench@") for r in json.loads(body)),
    )
    return proc


def measure(port: int, args: argparse.Namespace, pid: int | None) -> dict[str, float]:
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        pinned(
            role(
                "load",
                str(port),
                str(args.sessions),
                str(args.window),
                str(args.size),
                str(args.duration),
            ),
            LOAD_CPU,
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=args.duration + 60,
    ).stdout
    result = json.loads(out)
    rate = result["replies"] / result["seconds"]
    measured: dict[str, float] = {"replies_per_s": rate, "refills": result["refills"]}
    if pid:
        # the load's warm-up and wind-down are in this span too: an upper bound per reply
        cpu = cpu_seconds(pid) - before
        measured["cpu_us_per_roundtrip"] = cpu / max(1, result["replies"]) * 1e6
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin (default: the proxy on CPU 1, the rest on CPU 0)",
    )
    parser.add_argument("--no-traefik", action="store_true")
    args = parser.parse_args()
    PINNING["on"] = args.pin
    backend, mesh, floor, traefik = (free_udp_port() for _ in range(4))
    admin, api = free_port(), free_port()
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="udp-bench-") as tmp:
        workdir = Path(tmp)
        try:
            echo = subprocess.Popen(pinned(role("echo", str(backend)), LOAD_CPU))
            procs.append(echo)
            dynamic = udp_dynamic(backend)
            mesh_proc = start_meshproxy(workdir, mesh, admin, dynamic)
            procs.append(mesh_proc)
            floor_proc = subprocess.Popen(
                pinned(role("floor", str(floor), str(backend)), PROXY_CPU)
            )
            procs.append(floor_proc)
            targets: dict[str, tuple[int, int | None]] = {
                "direct": (backend, echo.pid),  # CPU: the echo server's
                "meshproxy": (mesh, mesh_proc.pid),
                "uvloop floor": (floor, floor_proc.pid),
            }
            if not args.no_traefik:
                traefik_proc = start_traefik(workdir, traefik, api, dynamic)
                procs.append(traefik_proc)
                targets["traefik 3.7"] = (traefik, traefik_proc.pid)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, (port, pid) in targets.items():
                    result = measure(port, args, pid)
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:14s} {result['replies_per_s']:10.0f} "
                        f"round trips/s, {result['refills']:.0f} windows resent after a loss",
                        flush=True,
                    )
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read()
            assert b"meshproxy_udp_datagrams_total" in metrics
        finally:
            stop_all(procs)
    import statistics

    from meshproxy.build_info import hot_path_state

    stamp = timestamp()
    lines = [
        f"# UDP datagrams per second ({stamp}, hot path {hot_path_state()})",
        "",
        f"UDP round trips/s (request datagram, echoed reply), {args.sessions} sessions x "
        f"{args.window} in flight, {args.size}-byte datagrams, {args.rounds} rounds of "
        f"{args.duration:g} s, targets back to back in each round; "
        + ("proxies pinned to CPU 1, load and echo to CPU 0. " if args.pin else "unpinned. ")
        + "Medians over rounds; `x direct` is the median of the per-round ratios (min-max in "
        "brackets).",
        "",
        "| target | round trips/s | x direct (same round) | CPU us / round trip | CPU x direct |",
        "|---|---:|---:|---:|---:|",
    ]
    report: dict[str, Any] = {
        "when": stamp,
        "setup": {**vars(args), "meshproxy_hot_path": hot_path_state()},
        "rounds": rounds,
    }
    for name, results in rounds.items():
        rate = statistics.median(r["replies_per_s"] for r in results)
        ratio = paired_ratio(results, rounds["direct"], "replies_per_s")
        cpu = (
            f"{statistics.median(r['cpu_us_per_roundtrip'] for r in results):.1f}"
            if "cpu_us_per_roundtrip" in results[0]
            else "-"
        )
        capacity = spread(paired(rounds["direct"], results, "cpu_us_per_roundtrip"))
        lines.append(
            f"| {name} | {rate:.0f} | "
            f"{spread(paired(results, rounds['direct'], 'replies_per_s'))} | {cpu} | {capacity} |"
        )
        report.setdefault("summary", {})[name] = {"replies_per_s": rate, "x_direct": ratio}
    save_section("udp", "udp_datagrams", report, lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "echo":
            run_echo(int(rest[0]))
        elif kind == "floor":
            run_floor(int(rest[0]), int(rest[1]))
        else:
            run_load(int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), float(rest[4]))
    else:
        main()
