"""Cores a process may use: affinity capped by a container's CPU quota (cgroup v1 and v2 files)."""

import os

import pytest

import faceage.cores as cores
from faceage.cores import cpu_quota, usable_cores


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cgroup_v2_quota_in_the_container_namespace(tmp_path):
    """`docker run --cpus 1.5`: /proc/self/cgroup reads 0::/ and /sys/fs/cgroup/cpu.max holds the quota."""
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "150000 100000\n")
    assert cpu_quota(tmp_path / "cg", tmp_path / "proc") == pytest.approx(1.5)


def test_a_cgroup_v2_quota_on_an_ancestor_and_the_lowest_wins(tmp_path):
    write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "cg" / "kubepods" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "200000 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cpu_quota(tmp_path / "cg", tmp_path / "proc") == pytest.approx(2.0)


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    write(tmp_path / "proc", "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path / "cg", tmp_path / "proc") == pytest.approx(0.5)
    write(tmp_path / "cg" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert cpu_quota(tmp_path / "cg", tmp_path / "proc") is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "cg", tmp_path / "no-such-proc-file") is None
    write(tmp_path / "proc", "0::/\n")
    assert cpu_quota(tmp_path / "cg", tmp_path / "proc") is None  # no cpu.max: the controller is not enabled


@pytest.mark.parametrize("quota,want", [(None, 64), (0.5, 1), (1.5, 2), (2.0, 2), (100.0, 64)])
def test_usable_cores_are_the_affinity_capped_by_the_quota_rounded_up(monkeypatch, quota, want):
    """A 2-CPU pod on a 64-core node counted 64 cores: 64 detection workers and ONNX Runtime threads."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cores, "cpu_quota", lambda: quota)
    assert usable_cores() == want


def test_the_service_and_the_stages_count_the_same_cores(monkeypatch):
    from faceage.predict import available_cores
    from faceage.training import _cores_per_rank

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cores, "cpu_quota", lambda: 2.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert available_cores() == 2 and _cores_per_rank() == 2
