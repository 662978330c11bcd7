"""The default worker count: the container's CPU quota (cgroup v2 cpu.max, cgroup v1
cpu.cfs_quota_us/cpu.cfs_period_us, see cgroups(7) and the kernel's sched-bwc.rst), bounded by
the affinity mask; files written in a temporary cgroup tree, read by the real code."""

from __future__ import annotations

import os
from pathlib import Path

from meshproxy.node.cpus import affinity_cpus, available_cpus, cgroup_cpus, quota_cpus


def test_quota_rounds_up_and_unlimited_is_none() -> None:
    """sched-bwc.rst: quota/period CPUs; -1 (v1) or `max` (v2) is no limit."""
    assert quota_cpus(200000, 100000) == 2
    assert quota_cpus(150000, 100000) == 2
    assert quota_cpus(10000, 100000) == 1
    assert quota_cpus(-1, 100000) is None
    assert quota_cpus(100000, 0) is None


def _v2(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_v2_root_cpu_max(tmp_path: Path) -> None:
    """A container with its own cgroup namespace sees its limit at the root: `300000 100000`."""
    root = _v2(tmp_path, {"cpu.max": "300000 100000\n"})
    assert cgroup_cpus(root, "0::/\n") == 3


def test_v2_nested_cgroup_tightest_ancestor_wins(tmp_path: Path) -> None:
    """cgroup v2: a limit on the pod's cgroup bounds its containers (cgroups(7), cpu.max)."""
    root = _v2(
        tmp_path,
        {
            "kubepods/pod1/cpu.max": "150000 100000\n",
            "kubepods/pod1/ctr/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpus(root, "0::/kubepods/pod1/ctr\n") == 2


def test_v2_unlimited_is_none(tmp_path: Path) -> None:
    root = _v2(tmp_path, {"cpu.max": "max 100000\n"})
    assert cgroup_cpus(root, "0::/\n") is None


def test_v1_cfs_quota(tmp_path: Path) -> None:
    """cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us under the cpu controller."""
    ctr = tmp_path / "cpu" / "docker" / "abc"
    ctr.mkdir(parents=True)
    (ctr / "cpu.cfs_quota_us").write_text("400000\n")
    (ctr / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(tmp_path, "4:cpu,cpuacct:/docker/abc\n") == 4


def test_no_cgroup_falls_back_to_affinity(tmp_path: Path) -> None:
    """No quota anywhere: the CPUs sched_getaffinity allows."""
    assert cgroup_cpus(tmp_path, "") is None
    assert available_cpus(tmp_path, "") == len(os.sched_getaffinity(0)) == affinity_cpus()


def test_quota_bounded_by_affinity(tmp_path: Path) -> None:
    """A quota above the CPUs the process may run on does not add workers."""
    root = _v2(tmp_path, {"cpu.max": "6400000 100000\n"})
    assert available_cpus(root, "0::/\n") == len(os.sched_getaffinity(0))
