"""PNG plots of a bench/suite.py report into docs/: throughput, p99 and proxy CPU per
operation for each workload and target, and the added latency at a fixed rate.

    python -m bench.plots [bench/results/suite-<when>.json]   (default: the newest)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {
    "direct": "#999999",
    "meshproxy-w1": "#1f77b4",
    "meshproxy-w2": "#6baed6",
    "haproxy": "#2ca02c",
    "nginx": "#9467bd",
    "traefik": "#d62728",
}


def _bars(report: dict[str, Any], key: str, title: str, unit: str | None, path: Path) -> Path:
    """One subplot per workload, one bar per target (a missing figure: no bar)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    workloads = list(report["median"])
    fig, axes = plt.subplots(3, 3, figsize=(13, 10))
    for ax, workload in zip(axes.flat, workloads, strict=False):
        by_target = report["median"][workload]
        names = [n for n in by_target if not math.isnan(by_target[n].get(key, math.nan))]
        values = [by_target[n][key] for n in names]
        ax.bar(range(len(names)), values, color=[COLORS.get(n, "#333333") for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        label = unit or report["setup"]["units"][workload] + "/s"
        ax.set_title(f"{workload} ({label})", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: {report['when']} (shared 2-CPU VM; medians)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _latency(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (rate, by_target) in zip(axes, report["added_latency_ms"].items(), strict=False):
        names = [n for n in by_target if n != "direct"]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [by_target[n]["p50_ms"] for n in names], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [by_target[n]["p99_ms"] for n in names], 0.4, label="p99")
        ax.axhline(0.1, color="#1f77b4", linestyle=":", linewidth=1)
        ax.axhline(0.5, color="#ff7f0e", linestyle=":", linewidth=1)
        ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"added latency at {rate} req/s (ms, proxy - direct)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw(report: dict[str, Any], docs: Path = DOCS) -> list[Path]:
    """Writes docs/bench-throughput.png, docs/bench-p99.png, docs/bench-cpu.png and
    docs/bench-added-latency.png; returns their paths."""
    return [
        _bars(report, "rate", "Throughput", None, docs / "bench-throughput.png"),
        _bars(report, "p99_ms", "p99 latency at saturation", "ms", docs / "bench-p99.png"),
        _bars(report, "cpu_us_per_op", "Proxy CPU per operation", "us/op", docs / "bench-cpu.png"),
        _latency(report, docs / "bench-added-latency.png"),
    ]


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else max(RESULTS.glob("suite-*.json"))
    for png in draw(json.loads(path.read_text())):
        print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
