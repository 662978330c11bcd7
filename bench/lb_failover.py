"""Failed requests when one of three servers dies mid-run, by protection (issue 13, item 7).

Three scenarios, each with its own three backends behind one proxy (one service per
scenario, so no scenario's state leaks into another):

    none      no health check, outlier detection off: Traefik's behaviour with no config
    health    loadBalancer.healthCheck every 1 s (timeout 500 ms), outlier detection off
    outlier   no health check, passive outlier detection with its defaults (meshproxy's default)

Each runs `--workers` closed-loop clients for `--seconds`; one backend stops listening and
drops its connections at a third of the run. Every request is a new connection (the
request helper of the tests), answered by the proxy; a non-200 counts as failed.

    python bench/lb_failover.py [--seconds 6] [--workers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS

from tests.helpers import ProxyProcess, request
from tests.integration.lb_backend import ControlledBackend

SCENARIOS: dict[str, dict[str, Any]] = {
    "none": {"outlierDetection": {"enabled": False}},
    "health": {
        "outlierDetection": {"enabled": False},
        "healthCheck": {"path": "/health", "interval": "1s", "timeout": "500ms"},
    },
    "outlier": {},
}


async def run(seconds: float, workers: int) -> dict[str, Any]:
    backends = {name: [await ControlledBackend(f"{name}{i}").start() for i in range(3)]
                for name in SCENARIOS}  # fmt: skip
    services = {
        name: {"loadBalancer": {"servers": [{"url": b.url} for b in backends[name]], **extra}}
        for name, extra in SCENARIOS.items()
    }
    routers = {
        name: {"rule": f"Host(`{name}.bench`)", "service": name, "entryPoints": ["web"]}
        for name in SCENARIOS
    }
    proxy = ProxyProcess(
        Path(tempfile.mkdtemp()), {"http": {"routers": routers, "services": services}}
    )
    await proxy.start()
    results: dict[str, Any] = {}
    try:
        for name in SCENARIOS:
            counts = {"ok": 0, "failed": 0}
            deadline = time.monotonic() + seconds

            async def client(
                host: str = f"{name}.bench",
                counts: dict[str, int] = counts,
                deadline: float = deadline,
            ) -> None:
                while time.monotonic() < deadline:
                    response = await request(proxy.port, host=host)
                    counts["ok" if response.status == 200 else "failed"] += 1

            async def kill(victim: ControlledBackend = backends[name][0]) -> None:
                await asyncio.sleep(seconds / 3)
                await victim.die()

            await asyncio.gather(kill(), *(client() for _ in range(workers)))
            total = counts["ok"] + counts["failed"]
            results[name] = {**counts, "total": total}
            print(f"{name:8} {counts['failed']:5d} failed of {total:6d} requests", flush=True)
    finally:
        proxy.stop()
        for group in backends.values():
            for backend in group:
                await backend.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    results = asyncio.run(run(args.seconds, args.workers))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"lb_failover-{stamp}.json"
    out.write_text(json.dumps({"seconds": args.seconds, "workers": args.workers, **results}))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
