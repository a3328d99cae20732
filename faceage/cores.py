"""How many CPU cores this process may use: its affinity mask, capped by a container's CPU quota.

``os.cpu_count()`` counts the host's cores, and the affinity mask (a cpuset, ``taskset``) says
which of them the process may run on; neither sees a CFS quota, which is what ``docker run
--cpus`` and a Kubernetes CPU limit set. A pod limited to 2 CPUs on a 64-core node would
otherwise start 64 detection workers and 64 ONNX Runtime threads, each waiting its turn in 2
CPUs' worth of time slices (and 64 workers' memory: about 130 MB each for preprocess).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root``/``path`` and each folder above it up to ``root`` (a limit may sit on any ancestor)."""
    here = root / path.lstrip("/")
    return [here, *(p for p in here.parents if p.is_relative_to(root))]


def cpu_quota(root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = PROC_CGROUP) -> float | None:
    """The CPUs' worth of time this process's cgroups allow (``cpu.max`` in cgroup v2,
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` in v1; the lowest on the way to the root), or None
    when there is no quota or no cgroup file can be read (not Linux, a sandbox)."""
    root = Path(root)
    text = _read(Path(proc_cgroup))
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2, the unified hierarchy
            for folder in _ancestors(root, path):
                fields = (_read(folder / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max" and fields[0].isdigit() and fields[1].isdigit():
                    limits.append(int(fields[0]) / max(int(fields[1]), 1))
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if not mount.is_dir():
                    continue
                for folder in _ancestors(mount, path):
                    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    if quota and period and quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0:
                        limits.append(int(quota) / max(int(period), 1))
                break
    return min(limits) if limits else None


def usable_cores() -> int:
    """The cores this process may use: its affinity mask (a cpuset's or a taskset's), capped by its
    cgroups' CPU quota rounded up (``--cpus 1.5`` -> 2); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)
