"""Round 37: Ctrl-C in a shell's loop of profiles. The profile runner (``python -m faceage.experiment``, what every
``make quick*`` target runs) exited 130 after Ctrl-C: bash then takes the child to have handled the signal itself
("wait and cooperative exit") and goes on with the next command, so Ctrl-C during the first profile of
``for p in ...; do python -m faceage.experiment ...; done`` started the second. Now it dies of SIGINT, as a stage
does (faceage.logs.run_stage), and the loop stops. Real bash, a real runner process, a real SIGINT to the group;
dvc is a shell script that stops on SIGINT as dvc does (it cleans up, then exits 255)."""

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
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and shell scripts as dvc")


def _default_sigint() -> None:  # a test run in the background (SIGINT ignored) would pass that on to the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("when", ["while dvc runs", "before dvc starts"])
def test_ctrl_c_stops_a_shell_loop_of_profiles(tmp_path, when):
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    bin_dir, up, cleaned, after = tmp_path / "bin", tmp_path / "up", tmp_path / "cleaned", tmp_path / "after"
    bin_dir.mkdir()
    if when == "while dvc runs":
        # A background job of a script ignores SIGINT: the trap ends the sleep, which otherwise held the pipes
        # (communicate's EOF) 30 s after the loop had stopped
        (bin_dir / "dvc").write_text(f"#!/bin/sh\ntrap 'kill $! 2>/dev/null; echo done > {cleaned}; exit 255' INT\n"
                                     f"echo up > {up}\nsleep 30 & wait $!\n")
    else:  # the runner reads the committed params.yaml with `git show` before dvc starts: a slow one
        (bin_dir / "git").write_text(f"#!/bin/sh\necho up > {up}\nsleep 30 & wait $!\n")
        (bin_dir / "dvc").write_text(f"#!/bin/sh\necho ran > {cleaned}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    loop = (f"for p in 1 2; do {sys.executable} -m faceage.experiment -S train.epochs=$p; "
            f"echo $p >> {after}; done")
    proc = subprocess.Popen(["bash", "-c", loop], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not up.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # the runner is in its wait
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        try:  # what is left of the group (the loop, or a fake tool's sleep once the loop has ended)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert not after.exists(), f"the loop went on after Ctrl-C ({after.read_text().split()}):\n{err}"
    assert proc.returncode == -signal.SIGINT, err  # bash itself stopped by the signal, as after a stage's Ctrl-C
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err, err
    if when == "while dvc runs":
        assert cleaned.exists(), err  # the runner still waited for dvc's clean-up
    else:
        assert not cleaned.exists(), err  # dvc never ran
