"""WebSocket echo through a proxy: messages per second and latency, HAProxy vs meshproxy.

One echo backend (the `websockets` package), HAProxy (1 thread, http mode: it tunnels the
upgrade) and meshproxy (1 worker) in front of it, and a load generator that keeps `--connections`
WebSockets busy, each sending a `--size`-byte message and waiting for its echo, for
`--duration` seconds per round. Rounds interleave the targets; ratios to HAProxy are medians of
per-round ratios (a shared VM drifts between rounds). Pinned as bench/http_throughput.py: the
proxy on CPU 1, the backend and the load generator on CPU 0 (`--no-pin` to turn off). Every
loop is bounded in time and stops by itself.

    python bench/websocket_echo.py [--rounds 5] [--duration 5] [--connections 20] [--size 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    LOAD_CPU,
    PINNING,
    ensure_tools,
    free_port,
    pinned,
    save_report,
    start_meshproxy,
    stop_all,
    timestamp,
    wait_port,
)
from common import (
    start_haproxy as start_haproxy_peer,
)

ECHO_BACKEND = """
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None, max_size=None):
        await asyncio.Future()

asyncio.run(main())
"""


def start_echo_backend(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(pinned([sys.executable, "-c", ECHO_BACKEND, str(port)], LOAD_CPU))


def start_haproxy(workdir: Path, port: int, backend: int) -> subprocess.Popen[bytes]:
    # http mode tunnels the upgrade; `timeout tunnel` keeps the WebSockets open
    return start_haproxy_peer(
        workdir, port, backend, "    default_backend app\n", "    timeout tunnel 1h\n"
    )


def start_meshproxy_ws(
    workdir: Path, port: int, admin: int, backend: int
) -> subprocess.Popen[bytes]:
    return start_meshproxy(
        workdir,
        port,
        admin,
        f"""http:
  routers:
    chat:
      entryPoints: [web]
      rule: PathPrefix(`/`)
      service: chat
  services:
    chat:
      loadBalancer:
        servers:
          - url: http://127.0.0.1:{backend}
""",
    )


async def load(port: int, connections: int, size: int, duration: float) -> dict[str, float]:
    """Echo round trips on `connections` WebSockets for `duration` seconds."""
    from websockets.asyncio.client import connect

    message = b"m" * size
    latencies: list[float] = []
    deadline = 0.0

    async def one() -> None:
        async with connect(
            f"ws://127.0.0.1:{port}/", compression=None, max_size=None, ping_interval=None
        ) as ws:
            await started.wait()
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                await ws.send(message)
                await ws.recv()
                latencies.append(time.perf_counter() - sent)

    started = asyncio.Event()
    tasks = [asyncio.create_task(one()) for _ in range(connections)]
    await asyncio.sleep(0.3)  # the handshakes: outside the measured window
    begin = time.perf_counter()
    deadline = begin + duration
    started.set()
    await asyncio.wait_for(asyncio.gather(*tasks), duration + 30)
    elapsed = time.perf_counter() - begin
    latencies.sort()
    return {
        "messages_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="message size in bytes")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args()
    PINNING["on"] = args.pin
    if args.pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # the load generator beside the backend
    ensure_tools()
    backend, haproxy, mesh, admin = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    rounds: dict[str, list[dict[str, float]]] = {"backend": [], "haproxy": [], "meshproxy": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            procs.append(start_echo_backend(backend))
            procs.append(start_haproxy(workdir, haproxy, backend))
            procs.append(start_meshproxy_ws(workdir, mesh, admin, backend))
            targets = {"backend": backend, "haproxy": haproxy, "meshproxy": mesh}
            for port in targets.values():
                wait_port(port)
            time.sleep(0.5)
            for port in targets.values():  # warm-up
                asyncio.run(load(port, args.connections, args.size, 1.0))
            for index in range(args.rounds):
                for name, port in targets.items():
                    result = asyncio.run(load(port, args.connections, args.size, args.duration))
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:10s} {result['messages_per_s']:9.0f} msg/s "
                        f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms",
                        flush=True,
                    )
        finally:
            stop_all(procs)
    median = {
        name: {k: statistics.median(r[k] for r in results) for k in results[0]}
        for name, results in rounds.items()
    }
    ratio = {
        name: {
            "messages_per_s": statistics.median(
                r["messages_per_s"] / h["messages_per_s"]
                for r, h in zip(results, rounds["haproxy"], strict=True)
            ),
            "p99": statistics.median(
                r["p99_ms"] / h["p99_ms"] for r, h in zip(results, rounds["haproxy"], strict=True)
            ),
        }
        for name, results in rounds.items()
    }
    stamp = timestamp()
    report = {
        "when": stamp,
        "setup": {
            "connections": args.connections,
            "message_bytes": args.size,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "pinned": args.pin,
            "client": "websockets (Python), echo backend: websockets",
        },
        "rounds": rounds,
        "median": median,
        "ratio_to_haproxy": ratio,
    }
    lines = [
        f"# WebSocket echo ({stamp})",
        "",
        f"{args.connections} WebSockets, {args.size}-byte messages, each waiting for its echo; "
        f"{args.rounds} interleaved rounds of {args.duration:g} s, same backend for all; "
        + ("proxies pinned to CPU 1, load and backend to CPU 0. " if args.pin else "unpinned. ")
        + "Medians over rounds; ratios are medians of per-round ratios.",
        "",
        "| target | messages/s | p50 ms | p99 ms | msg/s vs HAProxy | p99 vs HAProxy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in median.items():
        lines.append(
            f"| {name} | {m['messages_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{ratio[name]['messages_per_s']:.2f}x | {ratio[name]['p99']:.2f}x |"
        )
    save_report("websocket_echo", report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
