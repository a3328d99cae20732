"""The crop path's process map, third look: workers that hang after the parent used dlib's CNN, workers
left running when the stage is killed."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from faceage.chips import map_in_processes
from tests.unit.test_crop_r24 import _deadline, interrupted_map

_worker: dict = {}


def _init_detector(model_dir: str) -> None:
    from faceage.faces import FaceDetector

    _worker["detector"] = FaceDetector(model_dir, "hog", 1, 0.35, 400)


def _faces_in_a_blank_photo(_item) -> int:
    """No face there: both HOG looks miss, so the CNN's last look runs."""
    return len(_worker["detector"].detect(np.full((120, 160, 3), 128, np.uint8)))


def test_workers_run_the_cnn_after_this_process_has_run_it(detector_dir):
    """Forked workers inherited dlib's thread pool as the parent's CNN run left it, without its threads: the
    CNN look waited for them for ever (crop_samples with workers=1, then workers=2, in one process)."""
    _init_detector(str(detector_dir))
    assert _faces_in_a_blank_photo(None) == 0  # this process has run the CNN once
    with _deadline(40):
        found = map_in_processes(_faces_in_a_blank_photo, list(range(4)), 2, _init_detector, (str(detector_dir),),
                                 desc=None, unit="img")
    assert found == [0, 0, 0, 0]


def _workers_of(pid: int) -> set[int]:
    """The spawned worker children of ``pid``: not multiprocessing's resource tracker, nor an import's
    short-lived ``ldconfig -p`` (ctypes' find_library)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if (int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid
                    and b"spawn_main" in (stat.parent / "cmdline").read_bytes()):
                found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_the_workers_end_when_the_stage_is_killed():
    """`kill` of a preprocess run (or a timeout around it) ended the stage; its workers, each holding its
    detectors, waited for work for ever."""
    code = ("import os, time\nfrom faceage.chips import map_in_processes\n"
            "map_in_processes(time.sleep, [0.5] * 400, 2, os.getpid, (), desc=None, unit='item')\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    workers: set[int] = set()
    try:
        start = time.monotonic()
        while len(workers) < 2 and time.monotonic() - start < 30:
            workers = {pid for pid in _workers_of(parent.pid) if _alive(pid)}
            time.sleep(0.2)
        assert len(workers) >= 2, workers
        time.sleep(1.0)  # at work on their first items
        parent.send_signal(signal.SIGTERM)
        parent.wait(10)
        start = time.monotonic()
        while any(_alive(pid) for pid in workers) and time.monotonic() - start < 10:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived the killed stage"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_map_interrupted_at_any_moment_leaves_no_worker_seen_running():
    """The executor's manager thread reaps the workers too: a join that lost that race returned before the worker
    was marked stopped, and the caller (CI, under load) still saw it running. Interrupted at 12 moments from
    5 to 115 ms, 12 of 20 such maps left one (measured); none may."""
    for delay in [0.005 + 0.01 * i for i in range(12)]:
        _, _, left = interrupted_map(delay)
        assert not left, f"interrupted after {delay * 1000:.0f} ms: {left} still running"
