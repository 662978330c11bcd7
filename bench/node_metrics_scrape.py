"""Scrape cost of a node's /metrics at 10k series, both ways (issue 15 point 2, docs/workers.md):

- aggregate: each worker renders its own registry (prometheus-client generate_latest) and the
  supervisor sums the texts (meshproxy.node.metrics.merge);
- multiprocess: prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR): workers
  write mmap'ed files, the scrape reads every file of every worker (MultiProcessCollector).

Each worker holds `--series` counter series (histograms would multiply both costs alike).
Bounded: `--rounds` scrapes each, the minimum and median reported. Usage:
    .venv/bin/python bench/node_metrics_scrape.py [--series 10000] [--workers 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = """
import os, sys
from prometheus_client import Counter
c = Counter("traefik_router_requests", "x", ["router", "code", "method"])
n = int(sys.argv[1])
for i in range(n):
    c.labels(f"router-{i // 10}", str(200 + i % 10), "GET").inc(i)
print("ok")
"""


def aggregate(
    series: int, workers: int, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from meshproxy.node.metrics import merge

    registries = []
    for _ in range(workers):
        registry = CollectorRegistry()
        c = Counter("traefik_router_requests", "x", ["router", "code", "method"], registry=registry)
        for i in range(series):
            c.labels(f"router-{i // 10}", str(200 + i % 10), "GET").inc(i)
        registries.append(registry)
    render, merging, total = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        texts = [generate_latest(r).decode() for r in registries]
        t1 = time.perf_counter()
        merge(texts)
        t2 = time.perf_counter()
        render.append((t1 - t0) / workers)  # each worker renders its own, in parallel
        merging.append(t2 - t1)
        total.append(t2 - t0)
    return render, merging, total


def multiprocess(series: int, workers: int, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory)
        for _ in range(workers):
            subprocess.run(
                [sys.executable, "-c", WORKER, str(series)], env=env, check=True, timeout=300
            )
        code = f"""
import time
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
times = []
for _ in range({rounds}):
    t0 = time.perf_counter()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    generate_latest(registry)
    times.append(time.perf_counter() - t0)
print(" ".join(map(str, times)))
"""
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, timeout=300, capture_output=True
        )
        return [float(x) for x in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    render, merging, total = aggregate(args.series, args.workers, args.rounds)
    multi = multiprocess(args.series, args.workers, args.rounds)

    def ms(values: list[float]) -> str:
        return f"min {min(values) * 1e3:.1f} ms, median {statistics.median(values) * 1e3:.1f} ms"

    print(f"{args.series} series per worker, {args.workers} workers, {args.rounds} scrapes")
    print(f"aggregate: one worker's render {ms(render)}; the supervisor's merge {ms(merging)}")
    print(f"aggregate: all renders one after the other + merge {ms(total)}")
    print(f"multiprocess: collect + render {ms(multi)}")


if __name__ == "__main__":
    main()
