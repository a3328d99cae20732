"""Round 38's review of the benchmarks: what a stopped run leaves behind, and bench_cnn_threads' arguments.

A benchmark stopped by SIGTERM (``kill PID``, a CI job's cancel, a container's stop) ended at once, without its
``finally`` blocks or ``TemporaryDirectory`` clean-up: ``bench_omp_wait`` left its ``--busy`` processes spinning a
core each for ever, and ``bench_external_crops``, ``bench_detect`` and ``bench_cnn_retry`` left their temporary folder
(the fetched detector, 223 MB of crops for ``bench_external_crops``) in ``$TMPDIR``. Each now turns SIGTERM into
``SystemExit`` (``_server.exit_on_sigterm``), as the server benchmarks do. Real processes, real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from faceage.cores import usable_cores
from tests.conftest import shared_datasets

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def start(script: str, *args: str, tmpdir: Path) -> subprocess.Popen:
    """``python benchmarks/<script> args`` in a session of its own, ``$TMPDIR`` pointed at ``tmpdir``."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(BENCH / script), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: str, ready: Callable[[], object], proc: subprocess.Popen, timeout_s: float = 240):
    """``ready()``'s first true value, polled while ``proc`` runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = ready()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the benchmark exited ({proc.returncode}) before {what}:\n{proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} after {timeout_s} s")


def terminate(proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """SIGTERM to the benchmark alone (not its group: what ``kill PID`` sends); its exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout_s)


@pytest.fixture
def reaped():
    """Processes started by a test (``list.append`` them): their whole session is killed afterwards, whatever the
    test's outcome, so a failing test leaves nothing spinning."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        kids = []
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for p in [*kids]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.skipif(usable_cores() < 2, reason="bench_omp_wait refuses to run on one core")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_omp_wait_stopped_stops_its_busy_processes(sig, tmp_path, reaped):
    proc = start("bench_omp_wait.py", "--rounds", "1", "--steps", "1", "--size", "32", "--batch", "2", "--busy", "1",
                 tmpdir=tmp_path / "t")
    reaped.append(proc)

    def spinner():
        try:
            kids = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return next((k for k in kids if "while True" in _cmdline(k)), None)

    busy = wait_for("a --busy process", spinner, proc)
    proc.send_signal(sig)  # to the benchmark alone: what `kill [-9] PID` sends
    assert proc.wait(timeout=120) != 0
    gone, alive = psutil.wait_procs([busy], timeout=15)
    assert not alive, f"bench_omp_wait's --busy process {busy.pid} still spins after the benchmark was stopped"


def _cmdline(proc: psutil.Process) -> str:
    """Its command line; "" for one that has ended (a child not yet reaped is a zombie)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _tmp_entries(tmpdir: Path, pattern: str) -> list[Path]:
    return sorted(tmpdir.glob(pattern))


def test_external_crops_sigterm_removes_its_temporary_cache(tmp_path, reaped):
    if not (shared_datasets() / "utk-external").is_dir():
        pytest.skip("needs the shared utk-external set (evaluate.external)")
    tmpdir = tmp_path / "t"
    proc = start("bench_external_crops.py", "--workers", "1", tmpdir=tmpdir)
    reaped.append(proc)
    wait_for("the crop cache", lambda: _tmp_entries(tmpdir, "faceage-bench-external-*/cache"), proc)
    time.sleep(1)
    assert terminate(proc) != 0
    assert _tmp_entries(tmpdir, "faceage-bench-external-*") == [], "a stopped run left its temporary cache behind"


@pytest.mark.parametrize("script", ["bench_detect.py", "bench_cnn_retry.py"])
def test_detection_benchmarks_sigterm_remove_the_fetched_detector(script, tmp_path, reaped):
    wild = shared_datasets() / "wild"
    if not wild.is_dir():
        pytest.skip("needs the shared wild photos")
    if script == "bench_detect.py" and usable_cores() < 2:
        pytest.skip("bench_detect refuses to run on one core")
    tmpdir = tmp_path / "t"
    proc = start(script, "--photos", str(wild), "--rounds", "50", tmpdir=tmpdir)
    reaped.append(proc)
    # The fetched folder is whole once its manifest is written; the measuring starts then.
    wait_for("the fetched detector", lambda: _tmp_entries(tmpdir, "tmp*/dlib/manifest.json"), proc)
    time.sleep(2)
    assert terminate(proc) != 0
    assert _tmp_entries(tmpdir, "tmp*") == [], "a stopped run left its fetched detector behind"


@pytest.mark.parametrize("args, named", [(["--rounds", "0"], "--rounds"), (["--workers", "0"], "--workers"),
                                         (["--photos", "0"], "--photos"), (["--upsample", "-1"], "--upsample")])
def test_cnn_threads_refuses_bad_counts_in_one_line(args, named, tmp_path):
    """``--rounds 0`` ended in StatisticsError ('no median for empty data') and ``--workers 0`` in an IndexError, each
    after the detector was fetched and the CNN run; now argparse's one line, before any work."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_cnn_threads.py"), *args],
                         env={**os.environ, "TMPDIR": str(tmp_path)}, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert named in out.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # nothing fetched
