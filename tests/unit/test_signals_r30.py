"""Round 30: signals and error lines in the profile runner (faceage.experiment) and the stage wrapper (run_stage).

Real subprocesses and real signals wherever the behaviour is about signals.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faceage.experiment as experiment
from faceage.errors import FaceAgeError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and shell scripts as git and dvc")


def _wait_for(path: Path, proc: subprocess.Popen, out: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)


def _runner(tmp_path: Path, bin_dir: Path, preexec_fn=None) -> tuple[subprocess.Popen, Path]:
    """``python -m faceage.experiment -S train.epochs=1`` in a DVC repo at ``tmp_path``, in its own session
    (a terminal's Ctrl-C reaches its whole process group), with ``bin_dir`` first on PATH."""
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "faceage.experiment", "-S", "train.epochs=1"], cwd=tmp_path,
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn)
    return proc, out


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_ctrl_c_before_dvc_exp_run_started_says_nothing_ran_and_leaves_params_yaml_as_it_was(tmp_path):
    """Ctrl-C while the runner still read the committed params (before `dvc exp run`) was logged as "a `dvc exp
    run` it had started has stopped, and params.yaml keeps its -S values": nothing had started, nothing was set."""
    bin_dir, asked, dvc_ran = tmp_path / "bin", tmp_path / "git-asked", tmp_path / "dvc-ran"
    bin_dir.mkdir()
    _script(bin_dir / "git", f"#!/bin/sh\necho up > {asked}\nsleep 30 & wait $!\n")  # a slow `git show HEAD:...`
    _script(bin_dir / "dvc", f"#!/bin/sh\necho ran > {dvc_ran}\n")
    proc, out = _runner(tmp_path, bin_dir)
    before = (REPO / "params.yaml").read_bytes()
    try:
        _wait_for(asked, proc, out)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert code == -signal.SIGINT, text
    assert "before `dvc exp run` started" in text and "it had started has stopped" not in text, text
    assert "Traceback" not in text and not dvc_ran.exists(), text
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_ctrl_c_before_dvc_wrote_params_yaml_does_not_claim_it_keeps_the_s_values(tmp_path):
    """dvc stopped by Ctrl-C before it wrote its -S values: the line said params.yaml keeps them."""
    bin_dir, started, cleaned = tmp_path / "bin", tmp_path / "started", tmp_path / "cleaned"
    bin_dir.mkdir()
    _script(bin_dir / "dvc", f"#!/bin/sh\ntrap 'echo done > {cleaned}; exit 255' INT\n"
                             f"echo up > {started}\nsleep 30 & wait $!\n")
    proc, out = _runner(tmp_path, bin_dir)
    before = (tmp_path / "params.yaml").read_bytes()
    try:
        _wait_for(started, proc, out)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert code == -signal.SIGINT and cleaned.exists(), text
    assert "keeps its -S values" not in text and "params.yaml is unchanged" in text, text
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_ctrl_c_just_as_dvc_starts_still_waits_for_dvc(tmp_path, monkeypatch):
    """A Ctrl-C landing as `Popen` returns (Python raises it at the next bytecode) left `with Popen` unentered:
    the runner returned with dvc still running its clean-up (a real SIGINT, sent the moment dvc has started)."""
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    bin_dir, cleaned = tmp_path / "bin", tmp_path / "cleaned"
    bin_dir.mkdir()
    _script(bin_dir / "dvc", f"#!/bin/sh\nsleep 1\necho done > {cleaned}\nexit 255\n")
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args, **kwargs):
        child = real_popen(*args, **kwargs)
        if args and args[0][:1] == ["dvc"]:
            os.kill(os.getpid(), signal.SIGINT)  # only this process: the fake dvc runs on, as one that ignores it
        return child

    monkeypatch.setattr(experiment.subprocess, "Popen", popen_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_profile(["train.epochs=1"], root=tmp_path)
    assert cleaned.exists(), "run_profile returned before dvc had stopped"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


# --- run_stage ---------------------------------------------------------------------------------------------------

STAGE_HEAD = """
import atexit, logging, sys, time
from faceage.errors import FaceAgeError
from faceage.logs import run_stage, setup_logging

setup_logging()

class Slow(logging.Handler):  # a log line that takes long to write (a full pipe, a slow disk)
    def emit(self, record):
        if record.levelno >= logging.ERROR and "SLOW" in record.getMessage():
            print("logging", flush=True)
            time.sleep(30)
logging.getLogger("faceage").addHandler(Slow())
"""


def _stage(tmp_path: Path, body: str, preexec_fn=None) -> subprocess.Popen:
    script = tmp_path / "stage.py"
    script.write_text(STAGE_HEAD + body)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=preexec_fn)


def _signal_after(proc: subprocess.Popen, line: str, signum: int) -> tuple[int, str, str]:
    """Sends ``signum`` once the stage printed ``line``; its exit status, stdout and stderr."""
    try:
        assert proc.stdout.readline().strip() == line
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _term_after(proc: subprocess.Popen, line: str) -> tuple[int, str, str]:
    return _signal_after(proc, line, signal.SIGTERM)


def clean_up_that_fails(run: str) -> str:
    """A stage body whose main waits (after printing 'ready'), and whose clean-up then fails as ending an MLflow run
    on a server that does not answer does; ``run`` calls run_stage."""
    return ("def main():\n    try:\n        print('ready', flush=True)\n        time.sleep(30)\n"
            "    finally:\n        print('cleaning up', flush=True)\n"
            "        raise FaceAgeError('tracking server http://h:5000 does not answer')\n" + run + "\n")


def test_sigterm_while_a_stage_logs_its_error_ends_it_by_sigterm_without_a_traceback(tmp_path):
    """SIGTERM while run_stage wrote a FaceAgeError's line raised Terminated inside `except FaceAgeError`, where
    nothing caught it: two chained tracebacks, and the process died of SIGINT (Python's exit for an uncaught
    KeyboardInterrupt), not of SIGTERM."""
    proc = _stage(tmp_path, "def main():\n    raise FaceAgeError('SLOW bad input')\n"
                            "run_stage(main, interrupt_on_sigterm=True)\n")
    code, out, err = _term_after(proc, "logging")
    assert code == -signal.SIGTERM, (code, err)
    assert "Traceback" not in err and "Terminated" not in err, err


def test_a_clean_up_that_fails_after_sigterm_still_ends_the_stage_by_sigterm(tmp_path):
    """The stage's clean-up after SIGTERM (ending an MLflow run on a server that does not answer) raised a
    FaceAgeError: run_stage took it for the stage's own error and exited 1, as if no signal had come."""
    proc = _stage(tmp_path, clean_up_that_fails("run_stage(main, interrupt_on_sigterm=True)"))
    code, out, err = _term_after(proc, "ready")
    assert code == -signal.SIGTERM, (code, err)
    assert out.count("cleaning up") == 1
    assert "FaceAgeError: tracking server http://h:5000 does not answer" in err and "stopped by SIGTERM" in err, err
    assert "Traceback" not in err, err


def test_a_bug_in_the_clean_up_after_sigterm_shows_its_own_traceback_and_ends_by_sigterm(tmp_path):
    proc = _stage(tmp_path, "def main():\n    try:\n        print('ready', flush=True)\n        time.sleep(30)\n"
                            "    finally:\n        raise RuntimeError('bug in clean-up')\n"
                            "run_stage(main, interrupt_on_sigterm=True)\n")
    code, out, err = _term_after(proc, "ready")
    assert code == -signal.SIGTERM, (code, err)
    assert "RuntimeError: bug in clean-up" in err and "Terminated" not in err and "During handling" not in err, err


def test_sigterm_after_the_stage_returned_ends_it_by_sigterm_without_a_traceback(tmp_path):
    """run_stage left its handler in place: a SIGTERM while the interpreter shut down (MLflow's atexit end_run,
    data-loader workers joined) raised Terminated in an atexit callback ("Exception ignored ...") and exit 0."""
    proc = _stage(tmp_path, "def later():\n    print('exiting', flush=True)\n    time.sleep(30)\n"
                            "atexit.register(later)\n"
                            "run_stage(lambda: None, interrupt_on_sigterm=True)\n")
    code, out, err = _term_after(proc, "exiting")
    assert code == -signal.SIGTERM, (code, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_stage_without_sigterm_handling_keeps_the_default_action(tmp_path):
    proc = _stage(tmp_path, "import signal\ndef main():\n    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n"
                            "    print('ready', flush=True)\n    time.sleep(30)\nrun_stage(main)\n")
    code, out, err = _term_after(proc, "ready")
    assert code == -signal.SIGTERM and "Traceback" not in err, err


# --- one line per error ---------------------------------------------------------------------------------------


def test_a_hint_on_a_second_line_stays_on_the_stages_one_line(tmp_path):
    """DownloadError("...\\nWithout a connection ..., point fetch_data.source at ...") printed its hint as a second
    line without the time, level and name: `grep ERROR` and DVC's last-line summary lost it."""
    script = tmp_path / "stage.py"
    script.write_text("from faceage.download import DownloadError\nfrom faceage.logs import run_stage, setup_logging\n"
                      "setup_logging()\ndef main():\n"
                      "    raise DownloadError('every URL of a.zip failed:\\nhttp://a: HTTP 404\\nhttp://b: timed out\\n'"
                      "                        'Without a connection, point fetch_data.source at a local copy')\n"
                      "run_stage(main)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    [line] = [x for x in done.stderr.splitlines() if x.strip()]
    assert " ERROR faceage: DownloadError: every URL of a.zip failed: http://a: HTTP 404; http://b: timed out; " \
           "Without a connection, point fetch_data.source at a local copy" in line, done.stderr


def test_error_line_keeps_every_line_of_the_message():
    from faceage.errors import error_line

    assert error_line(FaceAgeError("a\n  b  \n\nc")) == "FaceAgeError: a; b; c"
    assert error_line(FaceAgeError("failed:\nx\ny")) == "FaceAgeError: failed: x; y"
    assert error_line(FaceAgeError("one line")) == "FaceAgeError: one line"
    assert str(FaceAgeError("a\nb")) == "a\nb"  # the exception itself keeps its message as raised


def test_the_profile_runner_prints_a_profile_error_in_one_line(tmp_path, monkeypatch, caplog):
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)
    monkeypatch.setattr(experiment, "run_profile", lambda *a, **k: (_ for _ in ()).throw(
        experiment.ProfileError("first\nsecond")))
    with caplog.at_level(logging.ERROR, logger="faceage"):
        assert experiment.main(["-S", "train.epochs=1"]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["first; second"]
