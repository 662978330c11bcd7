"""bench/results/memory.md and memory.json: issue 15 item 4's numbers, from the newest results.

Reads the newest JSON of each memory benchmark in bench/results (idle connections by kind
and tree, soaks by tag) and writes one table per question: what 10,000 idle connections cost
beside HAProxy, and whether RSS stays flat under steady load. Nothing is measured here.

    python bench/memory_summary.py
"""

from __future__ import annotations

import json
from typing import Any

from common import RESULTS
from soak import slope_and_spread

MIB = 1024 * 1024
BUDGET_MB = 50  # issue 15: 10,000 idle keep-alive connections, at most 50 MB over the baseline


def newest(prefix: str) -> dict[str, Any] | None:
    """The newest `<prefix>-<when>.json` (the timestamp right after the prefix)."""
    found = sorted(
        path
        for path in RESULTS.glob(f"{prefix}-2*.json")
        if path.name[len(prefix) + 1 :][:8].isdigit()
    )
    return json.loads(found[-1].read_text()) | {"file": found[-1].name} if found else None


def main() -> int:
    idle_runs = {
        "working tree": newest("idle_connections"),
        "working tree, TCP and TLS pipes": newest("idle_connections-l4"),
        "working tree, h2c again (beside the patched run)": newest("idle_connections-h2c-before"),
        "with s-h2-memory.patch": newest("idle_connections-h2c-patched"),
        "with s-tls-read-buffer.patch": newest("idle_connections-tls-patched"),
    }
    soaks = {
        "--workers=1, mixed load": newest("soak-w1"),
        "--workers=2, mixed load": newest("soak-w2"),
        "--workers=1, HTTP/1.1 keep-alive only": newest("soak-w1-only-h1"),
        "--workers=1, h2c only": newest("soak-w1-only-h2"),
        "--workers=1, new connections only": newest("soak-w1-only-new"),
        "--workers=1, h2c only, with s-h2-memory.patch": newest("soak-w1-only-h2-patched"),
        "--workers=1, mixed load, with both patches": newest("soak-w1-patched"),
        "--workers=2, mixed load, with both patches": newest("soak-w2-patched"),
    }
    lines = [
        "# Memory (issue 15 item 4)",
        "",
        "Shared, loaded 2-core VM (other engineers' tests and benchmarks ran beside these; the "
        "load average of each run is in its JSON); meshproxy interpreted (no mypyc .so); "
        "loopback; HAProxy 2.6, 1 thread, in the same run. Method and buffer bounds: "
        "docs/memory.md. Patches: /work/notes/s-h2-memory.patch, "
        "/work/notes/s-tls-read-buffer.patch (not in the tree yet).",
        "",
        f"## Idle connections (budget: {BUDGET_MB} MB over the idle baseline for 10,000)",
        "",
        "| run | proxy | kind | connections | RSS growth MiB | bytes per connection "
        "| within budget | file |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    summary: dict[str, Any] = {"idle": [], "soak": []}
    for run, report in idle_runs.items():
        if report is None:
            continue
        for proxy, kinds in report["results"].items():
            for kind, r in kinds.items():
                growth = r["rss_growth_bytes"]
                count = r["connections"]
                scaled_mb = growth / 1e6 * 10_000 / count
                ok = "yes" if scaled_mb <= BUDGET_MB else "no"
                lines.append(
                    f"| {run} | {proxy.split('@')[0]} | {kind} | {count:,} | {growth / MIB:+.1f} "
                    f"| {r['bytes_per_idle_connection']:.0f} | {ok} | {report['file']} |"
                )
                summary["idle"].append(
                    {"run": run, "proxy": proxy, "kind": kind, "connections": count}
                    | {"rss_growth_bytes": growth, "per_10k_mb": scaled_mb, "file": report["file"]}
                )
    lines += [
        "",
        "## Soak: RSS under steady load (least-squares slope after the warm-up)",
        "",
        "| run | minutes | slope MB/min | spread MB | first MB | last MB | requests ok | failed "
        "| file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run, report in soaks.items():
        if report is None:
            continue
        # refit on the samples taken while the load ran (a run before that fix also sampled
        # once after h2load had closed its connections)
        setup = report["setup"]
        fit = slope_and_spread(
            [
                (sample["t"], int(sample["rss"]))
                for sample in report["samples"]
                if setup["warm_up_minutes_left_out_of_fit"] * 60
                <= sample["t"]
                < setup["minutes"] * 60 - 0.5
            ]
        )
        ok = sum(v.get("succeeded", 0) for v in report["load"].values())
        failed = sum(v.get("failed", 0) for v in report["load"].values())
        lines.append(
            f"| {run} | {report['setup']['minutes']:g} | {fit['slope_mb_per_min']:+.3f} "
            f"| {fit['spread_mb']:.2f} | {fit.get('first_mb', 0):.1f} "
            f"| {fit.get('last_mb', 0):.1f} "
            f"| {ok:,} | {failed:,} | {report['file']} |"
        )
        summary["soak"].append({"run": run, "file": report["file"], "fit": fit})
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
