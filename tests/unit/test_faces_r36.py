"""Round 36, detection and the crop path: real dlib detectors, real forked processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A parent that runs one network of dlib's (HOG finds nothing in noise, so the CNN's last look runs; or the face
# encoder embeds a crop), then forks; the child runs one of them. The parent waits for the child at most 60 s,
# kills it if it is still there, and prints what it saw.
FORK_AFTER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from faceage.face_encoder import DlibFaceEncoder
    from faceage.faces import FaceDetector
    model_dir, first, then = sys.argv[1:4]
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3)).astype(np.uint8)
    nets = {"cnn": lambda: FaceDetector(model_dir, "hog", 1, retry_pad=0.0, cnn_retry_side=400).detect(noise),
            "encoder": lambda: DlibFaceEncoder(model_dir, 0.4).embed(noise).shape}
    print("parent", nets[first](), flush=True)
    pid = os.fork()
    if pid == 0:
        try:
            print("child", nets[then](), flush=True)
        except Exception as e:
            print("child raised", type(e).__name__, e, flush=True)
        os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("child exit", status, flush=True)
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung", flush=True)
""")


def run_fork_after(detector_dir, first: str, then: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "DLIB_NUM_THREADS"}
    environ.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", FORK_AFTER, str(detector_dir), first, then], env=environ,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout



def test_a_child_forked_after_the_cnn_ran_is_told_why_instead_of_waiting_for_ever(detector_dir):
    """dlib's CNN runs on dlib's thread pool, started at its first run; a fork copies the pool without its threads,
    and the child's first CNN look waited for them for ever (the pipeline's default cnn_retry_side: any faceless
    photo). The child now gets one error naming both ways out; the parent is unaffected."""
    out = run_fork_after(detector_dir, "cnn", "cnn", DLIB_NUM_THREADS="2")
    assert "parent []" in out
    assert "child hung" not in out, f"the forked child's CNN look waited for ever:\n{out}"
    assert "child raised CnnAfterForkError" in out, out
    assert "spawn" in out and "DLIB_NUM_THREADS=0" in out, out
    assert "child exit 0" in out


def test_with_dlib_num_threads_0_a_forked_child_runs_the_cnn_look(detector_dir):
    """The error's second way out: with no pool threads (DLIB_NUM_THREADS=0) the CNN runs on the calling thread,
    and a forked child detects as its parent did."""
    out = run_fork_after(detector_dir, "cnn", "cnn", DLIB_NUM_THREADS="0")
    assert "parent []" in out and "child []" in out, out
    assert "child exit 0" in out


# Module-level, so that the spawned workers of map_in_processes can unpickle them.
def mark_started(folder: str) -> None:
    Path(folder, str(os.getpid())).touch()


def slow_pid(item: int) -> int:
    import time

    time.sleep(1.0)  # a photo's detection: long enough that an idle worker takes the next one
    return os.getpid()


def test_a_few_photos_are_spread_over_the_workers_and_no_idle_worker_is_started(tmp_path):
    """map_in_processes (preprocess's crop loop, evaluate's external sets) handed out photos 16 at a time: 8 photos on
    2 workers all went to one of them (the set took its serial time), and every worker was started (each loading
    dlib's detectors, ~130 MB) also where there were fewer photos than workers."""
    from faceage.chips import map_in_processes

    started = tmp_path / "started"
    started.mkdir()
    pids = map_in_processes(slow_pid, list(range(8)), 2, mark_started, (str(started),), desc=None, unit="img")
    assert len(pids) == 8
    assert len(set(pids)) == 2, f"8 photos on 2 workers went to {len(set(pids))} of them"

    started2 = tmp_path / "started2"
    started2.mkdir()
    pids = map_in_processes(slow_pid, [0, 1], 4, mark_started, (str(started2),), desc=None, unit="img")
    assert len(pids) == 2
    assert len(list(started2.iterdir())) <= 2, "workers were started for photos that do not exist"
