"""How many CPUs this container may use: the default of `meshproxy proxy --workers`.

A container's CPU limit is a CFS quota, not a count of visible CPUs: a pod limited to 2 CPUs
on a 64-core node sees 64 in `os.cpu_count()` and in its affinity mask, and 64 workers would
be throttled into the quota of 2. So the quota wins when there is one (cgroup v2 `cpu.max`,
cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; see `quota_cpus` for the rounding),
bounded by the affinity mask (`sched_getaffinity`, what cpusets and `taskset` allow), else
the affinity mask alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(quota_us: int, period_us: int) -> int | None:
    """CPUs a CFS quota allows (`quota / period`, rounded up, at least 1), None when the quota
    is unlimited (negative or zero, as cgroup v1 writes -1) or the period is not positive.
    Rounded up because a fraction of a CPU still runs a worker: 1.5 CPUs run 2 workers,
    each throttled a little, rather than 1 that leaves half a CPU unused (Go's automaxprocs
    rounds down; a Python worker is one thread, so the spare half would stay idle)."""
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(the v2 path, the v1 cpu controller path) of this process, from /proc/self/cgroup
    lines `hierarchy-ID:controllers:path` (cgroup(7))."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    """The CPU quota of this process's cgroup (or of the first ancestor that has one, as a
    limit set on the pod applies to its containers), None when there is no limit.

    cgroup v2: `cpu.max` is `max 100000` (no limit) or `200000 100000` (2 CPUs). cgroup v1:
    `cpu.cfs_quota_us` is -1 (no limit) or the quota beside `cpu.cfs_period_us`. Inside a
    container the cgroup namespace usually makes the process's own cgroup the root (`/`), so
    the root files are read too."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(proc_cgroup)
    if (root / "cgroup.controllers").exists():  # the unified (v2) hierarchy is mounted here
        found = _walk_up(root, v2 or "/", _v2_quota)
        if found is not None:
            return found
    for base in (root / "cpu", root / "cpu,cpuacct"):
        if base.is_dir():
            found = _walk_up(base, v1 or "/", _v1_quota)
            if found is not None:
                return found
    return None


def _walk_up(base: Path, cgroup: str, read_quota: Callable[[Path], int | None]) -> int | None:
    parts = [p for p in cgroup.split("/") if p]
    best: int | None = None
    while True:
        directory = base.joinpath(*parts) if parts else base
        cpus = read_quota(directory)
        if cpus is not None:
            best = cpus if best is None else min(best, cpus)  # the tightest limit applies
        if not parts:
            return best
        parts.pop()


def _v2_quota(directory: Path) -> int | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        return quota_cpus(int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000)
    except ValueError:
        return None


def _v1_quota(directory: Path) -> int | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    try:
        return quota_cpus(int(quota), int(period))
    except ValueError:
        return None


def affinity_cpus() -> int:
    """CPUs this process may run on (cpusets, taskset), else the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """The default worker count: the cgroup quota, bounded by the affinity mask."""
    allowed = affinity_cpus()
    quota = cgroup_cpus(root, proc_cgroup)
    return allowed if quota is None else max(1, min(quota, allowed))
