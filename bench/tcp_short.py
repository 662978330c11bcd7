"""Short TCP connections per second: connect, send 1 KiB, read the 1 KiB echo, close; through
meshproxy's TCP route, HAProxy `mode tcp` and real Traefik 3.7, each on one core, and directly
to the echo server, in the same run.

The load is a separate process (uvloop, pinned with the echo server to CPU 0): `--concurrency`
clients each run connection after connection until `--connections` are done or `--timeout`
seconds passed (bounded both ways); it reports connections/s over the connections completed,
and the errors. Every target is measured once per round, back to back, so the ratios to
HAProxy are paired per round. The proxies' CPU time per connection is recorded too: steadier
than connections/s on a shared machine, and what the proxy itself costs when the load
generator (Python, one core) is the limit.

    python bench/tcp_short.py [--rounds 3] [--connections 6000] [--concurrency 16]
                              [--timeout 60] [--no-pin] [--no-traefik]

Results: the `tcp_short` section of bench/results/tcp.md and
bench/results/tcp_short-<when>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    cpu_seconds,
    free_port,
    pinned,
    start_haproxy_tcp,
    start_meshproxy_l4,
    start_traefik_l4,
    stop_all,
    timestamp,
    wait_port,
    wait_routers,
)
from bench.l4_common import paired, run_tcp_echo, save_section, spread
from bench.tcp_throughput import tcp_dynamic

PAYLOAD = 1024


class _ShortConnection(asyncio.Protocol):
    """One connection: writes the payload on connect, closes once the whole echo is back."""

    def __init__(self, payload: bytes, done: asyncio.Future[bool]) -> None:
        self.payload, self.done, self.received = payload, done, 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= len(self.payload):
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.received == len(self.payload))


def run_load(port: int, connections: int, concurrency: int, timeout: float) -> None:
    """Prints {"ok": n, "errors": n, "seconds": s}: `connections` short connections over
    `concurrency` clients, stopped at `timeout` seconds."""
    import uvloop

    payload = b"x" * PAYLOAD

    async def client(budget: list[int], counts: list[int], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while budget[0] > 0 and loop.time() < deadline:
            budget[0] -= 1
            done: asyncio.Future[bool] = loop.create_future()
            try:
                protocol = _ShortConnection(payload, done)
                await loop.create_connection(lambda p=protocol: p, "127.0.0.1", port)
                ok = await asyncio.wait_for(done, 10)
            except (OSError, TimeoutError):
                ok = False
            counts[0 if ok else 1] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        budget, counts = [connections], [0, 0]
        began = time.perf_counter()
        deadline = loop.time() + timeout
        await asyncio.gather(*(client(budget, counts, deadline) for _ in range(concurrency)))
        seconds = time.perf_counter() - began
        print(json.dumps({"ok": counts[0], "errors": counts[1], "seconds": seconds}))

    uvloop.run(main())


def role(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", *args]


def measure(port: int, args: argparse.Namespace, pid: int | None) -> dict[str, float]:
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        pinned(
            role(
                "load", str(port), str(args.connections), str(args.concurrency), str(args.timeout)
            ),
            LOAD_CPU,
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=args.timeout + 30,
    ).stdout
    done = json.loads(out)
    result = {
        "conn_per_s": done["ok"] / done["seconds"],
        "ok": float(done["ok"]),
        "errors": float(done["errors"]),
    }
    if pid:
        result["cpu_us_per_conn"] = (cpu_seconds(pid) - before) / max(1, done["ok"]) * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=6000, help="per target per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--no-traefik", action="store_true")
    args = parser.parse_args()
    PINNING["on"] = args.pin
    from meshproxy.build_info import hot_path_state

    backend, haproxy, mesh, admin = (free_port() for _ in range(4))
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="tcp-short-") as tmp:
        workdir = Path(tmp)
        try:
            procs.append(subprocess.Popen(pinned(role("echo", str(backend)), LOAD_CPU)))
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
            for port, _ in targets.values():
                wait_port(port)
            warm = argparse.Namespace(**{**vars(args), "connections": 300})
            for port, pid in targets.values():
                measure(port, warm, pid)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, (port, pid) in targets.items():
                    result = measure(port, args, pid)
                    rounds[name].append(result)
                    cpu = result.get("cpu_us_per_conn")
                    print(
                        f"round {index + 1} {name:14s} {result['conn_per_s']:8.0f} conn/s "
                        f"{result['errors']:.0f} errors"
                        + (f"  {cpu:.0f} CPU us/conn" if cpu else ""),
                        flush=True,
                    )
        finally:
            stop_all(procs)
    stamp = timestamp()
    report: dict[str, Any] = {
        "when": stamp,
        "setup": {
            **vars(args),
            "payload_bytes": PAYLOAD,
            "cpus": PINNING["on"] and "proxy on CPU 1, load and echo server on CPU 0",
            "meshproxy_hot_path": hot_path_state(),
            "haproxy_threads": 1,
            "traefik_gomaxprocs": 1,
        },
        "rounds": rounds,
        "x_haproxy_per_round": {
            n: paired(r, rounds["haproxy"], "conn_per_s") for n, r in rounds.items()
        },
    }
    lines = [
        f"## Short TCP connections ({stamp}, hot path {hot_path_state()})",
        "",
        f"Connect, {PAYLOAD} B sent and echoed, close; {args.connections} connections per "
        f"target per round over {args.concurrency} concurrent clients (one uvloop process), "
        f"{args.rounds} rounds, targets back to back in each round; "
        + ("proxies pinned to CPU 1, load and echo server to CPU 0. " if args.pin else "unpinned. ")
        + "Medians over rounds; `x HAProxy` is the median of the per-round ratios (min-max in "
        "brackets).",
        "",
        "| target | connections/s | x HAProxy (same round) | errors | proxy CPU us / conn |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, results in rounds.items():
        rate = statistics.median(r["conn_per_s"] for r in results)
        errors = sum(r["errors"] for r in results)
        cpu = (
            f"{statistics.median(r['cpu_us_per_conn'] for r in results):.0f}"
            if "cpu_us_per_conn" in results[0]
            else "-"
        )
        ratio = spread(report["x_haproxy_per_round"][name])
        lines.append(f"| {name} | {rate:.0f} | {ratio} | {errors:.0f} | {cpu} |")
    save_section("tcp", "tcp_short", report, lines)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "echo":
            run_tcp_echo(int(rest[0]))
        else:
            run_load(int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3]))
    else:
        raise SystemExit(main())
