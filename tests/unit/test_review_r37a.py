"""Second read of round 37 (helper a): the backbone sweep (``python -m faceage.sweep``) after Ctrl-C.

Round 37 made the sweep end by SIGINT after Ctrl-C (``faceage.experiment.end_like_a_shell``), as the profile runner
does, so that a shell's script or loop stops; only the runner's side had a test. Real bash, a real sweep process, a
real SIGINT to the group; the sweep waits in its check of the tracking server, a socket on 127.0.0.1 that takes the
connection and never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and bash")


def _default_sigint() -> None:  # a test run in the background (SIGINT ignored) would pass that on to the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c_in_a_loop(tmp_path: Path, command: str) -> tuple[subprocess.Popen, str, Path]:
    """Runs ``for p in 1 2; do <command>; echo $p >> after; done`` in bash with MLFLOW_TRACKING_URI at a server
    that never answers; once the first sweep is waiting for it, sends SIGINT to the group (the terminal's Ctrl-C).
    Returns the ended bash process, its stderr and the ``after`` file."""
    after = tmp_path / "after"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.getsockname()[1]}",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.Popen(["bash", "-c", f"for p in 1 2; do {command}; echo $p >> {after}; done"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    try:
        silent.settimeout(120)  # the sweep's imports (torch) under load
        try:
            conn, _ = silent.accept()  # the first sweep probes the server: it waits for the answer
        except TimeoutError:
            pytest.fail(f"the sweep never reached the tracking server: {proc.poll()}")
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        conn.close()
        silent.close()  # a second sweep (the loop going on) is refused at once, not left waiting
        _, err = proc.communicate(timeout=120)
    finally:
        silent.close()
        try:  # what is left of the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc, err, after


def test_ctrl_c_stops_a_shell_loop_of_sweeps(tmp_path):
    """Exiting 130 after Ctrl-C let bash's loop go on to the next sweep ("wait and cooperative exit")."""
    proc, err, after = _ctrl_c_in_a_loop(tmp_path, f"{sys.executable} -m faceage.sweep --profile cpu "
                                                   "--backbones resnet18")
    assert not after.exists(), f"the loop went on after Ctrl-C ({after.read_text().split()}):\n{err[-3000:]}"
    assert proc.returncode == -signal.SIGINT, err[-3000:]  # bash stopped by the signal, as after a stage's Ctrl-C
    assert "sweep interrupted (Ctrl-C)" in err and "Traceback" not in err, err[-3000:]


def test_a_sweep_whose_dvc_is_killed_names_the_signal_and_exits_as_a_shell_does(tmp_path):
    """`dvc exp run` killed outright (the OOM killer's SIGKILL, on a box sweeping backbones): the sweep said "`dvc exp
    run` failed (exit -9), its output is above" (there is none) and exited 247 (-9 & 255), where the profile runner
    names the signal and exits 137, as a shell does."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text("#!/bin/sh\nkill -9 $$\n")
    (bin_dir / "dvc").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run([sys.executable, "-m", "faceage.sweep", "--profile", "cpu", "--backbones", "resnet18"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGKILL, done.stderr[-3000:]
    assert "`dvc exp run` was killed by signal 9 (SIGKILL)" in done.stderr, done.stderr[-3000:]
    assert "exit -9" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert str(tmp_path / "reports" / "sweep_runs.json") in done.stderr  # where the runs before it are
