"""Per-request cost of the loadBalancer's own work, by strategy (issue 13, item 7).

Times `LoadBalancerService.serve` plus its try's `done` over three servers whose pool answers
at once (no sockets, no parsing): the pick, in-flight counting, the latency sample, the outlier
detector's fast path, the service metrics. Strategies are interleaved and the minimum of
`--rounds` kept, because the machine is shared. Run it from an installed (compiled) tree for
the compiled figure; with MESHPROXY_PURE_PYTHON=1 for the interpreted one.

    python bench/balancer_strategies.py [--requests 100000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from common import RESULTS

from meshproxy.balancer.http_services import LoadBalancerService
from meshproxy.balancer.outlier import OutlierDetector, OutlierSettings
from meshproxy.balancer.sticky import Sticky
from meshproxy.build_info import hot_path_state
from meshproxy.config.dynamic import Cookie
from meshproxy.http.exchange import Exchange, NullSink
from meshproxy.http.request import Request
from meshproxy.http.upstream import ServerTarget
from meshproxy.observability.metrics import RequestMetrics

CASES = ("wrr", "p2c", "ewma", "wrr+sticky")


class AnsweringPool:
    """A ServerPool whose every try ends at once with a 200."""

    busy: set[Any] = set()

    def send(self, ex: Exchange, target: ServerTarget, done: Any) -> None:
        ex.status = 200
        done(None)

    def sweep(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def _finish(ex: Exchange, exc: BaseException | None) -> None:
    pass


def measure(case: str, requests: int) -> float:
    """Microseconds per request for `case`."""
    strategy = case.split("+")[0]
    metrics = RequestMetrics()
    servers = [(ServerTarget(f"http://10.0.0.{i}:80", AnsweringPool(), b"x"), 1) for i in range(3)]
    sticky = None
    if case.endswith("sticky"):
        sticky = Sticky(Cookie(name="lb"), "app@file", [t.url for t, _ in servers])
    service = LoadBalancerService(
        "app@file",
        servers,
        True,
        metrics,
        None,
        strategy,
        sticky,
        OutlierDetector(OutlierSettings(), metrics),
    )
    request = Request("GET", b"/", [(b"host", b"app")], b"app", "127.0.0.1", 40000)
    ex = Exchange(NullSink(), request, "web", 0.0, False)
    serve = service.serve
    for _ in range(2000):
        ex.response_hooks = None
        serve(ex, _finish)
    started = time.perf_counter()
    for _ in range(requests):
        ex.response_hooks = None
        serve(ex, _finish)
    return (time.perf_counter() - started) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for case in CASES:
            best[case] = min(best.get(case, float("inf")), measure(case, args.requests))
    result = {
        "hot_path": hot_path_state(),
        "us_per_request": {k: round(v, 3) for k, v in best.items()},
        "over_wrr": {k: round(v - best["wrr"], 3) for k, v in best.items()},
    }
    print(json.dumps(result, indent=1))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"balancer_strategies-{stamp}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
