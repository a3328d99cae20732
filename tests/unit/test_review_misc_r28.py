"""Review round 28 (profile runner, decoding, cores, HOG split): defects found, each pinned by a test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and a shell script as dvc")
def test_ctrl_c_lets_dvc_finish_its_cleanup_before_the_runner_returns(tmp_path):
    """Ctrl-C reaches the whole foreground group: dvc ignores it while its stage stops, then removes its
    experiment refs, infofile and locks. subprocess.run killed dvc 0.25 s after the KeyboardInterrupt: the
    prompt came back with the stage still running, refs/exps/exec/EXEC_* and stale locks left behind, and
    a traceback. Now the runner waits for dvc, then dies of SIGINT (a shell shows 130) with one line."""
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    bin_dir, started, cleaned = tmp_path / "bin", tmp_path / "started", tmp_path / "cleaned"
    bin_dir.mkdir()
    # dvc's own behaviour, in miniature: on SIGINT it lets its stage stop (1 s here) and cleans up, then exits 255
    (bin_dir / "dvc").write_text(f"#!/bin/sh\ntrap 'sleep 1; echo done > {cleaned}; exit 255' INT\n"
                                 f"echo up > {started}\nsleep 5 & wait $!\n")
    (bin_dir / "dvc").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    with open(tmp_path / "out.txt", "w") as out:
        runner = subprocess.Popen([sys.executable, "-m", "faceage.experiment", "-S", "train.epochs=1"], cwd=tmp_path,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not started.exists():
                assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
                time.sleep(0.05)
            time.sleep(0.2)  # the runner is back from Popen, in its wait
            os.killpg(runner.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
            code = runner.wait(timeout=30)
        finally:
            if runner.poll() is None:
                runner.kill()
    text = (tmp_path / "out.txt").read_text()
    assert cleaned.exists(), f"the runner returned before dvc had cleaned up (exit {code}):\n{text}"
    assert code == -signal.SIGINT, text
    assert "Traceback" not in text and "interrupted" in text, text
