"""Round-31 review of the train stage's relaunch under torchrun (:mod:`faceage.launch`) and of how its processes
log and die: which rank failed and why, signals the launcher had been told to ignore, rank-prefixed log lines.

The relaunch tests run a real 2-process gloo torchrun of a tiny script (no model, no data: a few seconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from faceage.launch import _failure_summary
from tests.conftest import REPO

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")


def _failure(rank: int, exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")


def test_the_crashed_rank_is_named_as_the_cause_not_the_ranks_stopped_with_it():
    """Rank 1 segfaulted; torchrun then stopped rank 0 with SIGTERM. The line said "2 training process(es)
    failed (rank 0 killed by SIGTERM, rank 1 killed by SIGSEGV); their log above says why": rank 0 first, as a
    failure, and a segfault logs nothing."""
    error = ChildFailedError("train", {0: _failure(0, -signal.SIGTERM), 1: _failure(1, -signal.SIGSEGV)})
    line = _failure_summary(error)
    assert line.startswith("train: rank 1 killed by SIGSEGV"), line
    assert "rank 0 stopped with it" in line and "2 training process(es) failed" not in line, line
    assert "\n" not in line


def test_a_rank_killed_by_sigkill_points_at_the_out_of_memory_killer():
    error = ChildFailedError("train", {0: _failure(0, -signal.SIGTERM), 3: _failure(3, -signal.SIGKILL)})
    line = _failure_summary(error)
    assert line.startswith("train: rank 3 killed by SIGKILL"), line
    assert "out of memory" in line.lower() or "out-of-memory" in line.lower(), line


def test_a_rank_that_exited_with_an_error_still_points_at_its_log():
    error = ChildFailedError("train", {1: _failure(1, 1)})
    line = _failure_summary(error)
    assert line.startswith("train: rank 1 exit code 1"), line
    assert "log above" in line, line


# A launcher as stages/train.py is one (run_stage around relaunch), of a worker that joins gloo, says so, and waits.
_WORKER = textwrap.dedent("""
    import os, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    print("joined", os.environ["RANK"], flush=True)
    time.sleep(float(os.environ.get("R31_SLEEP", "4")))
    dist.destroy_process_group()
""")
_LAUNCHER = textwrap.dedent("""
    import sys
    from faceage.launch import relaunch
    from faceage.logs import run_stage, setup_logging
    setup_logging()
    run_stage(lambda: relaunch(2, sys.argv[1], []), interrupt_on_sigterm=True)
""")


def _launch(tmp_path, ignore: tuple[signal.Signals, ...] = ()) -> subprocess.Popen:
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                          "TORCHELASTIC_SIGNALS_TO_HANDLE")}

    def ignored():  # as nohup (SIGHUP) or a non-interactive shell's `cmd &` (SIGINT, SIGQUIT) start it
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(worker)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ignored)


def _until_both_joined(proc: subprocess.Popen) -> None:
    joined = 0
    while joined < 2:
        line = proc.stdout.readline()
        assert line, (joined, proc.wait(timeout=60), proc.stderr.read()[-3000:])
        joined += line.count("joined")  # (unbuffered, print writes the text and its newline apart)


def _signalled_once_joined(proc: subprocess.Popen, *signals: signal.Signals) -> str:
    """Sends ``signals`` to the launcher once both ranks joined; its stderr when it ended (killed, by its own pid,
    if it had not within 90 s)."""
    try:
        _until_both_joined(proc)
        for sig in signals:
            proc.send_signal(sig)
        return proc.communicate(timeout=90)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@linux_only
def test_a_signal_the_launcher_ignores_does_not_stop_the_training(tmp_path):
    """``nohup dvc repro &``: SIGHUP is ignored, and the terminal closing must not stop the training. torch's
    launcher set its own handler for SIGTERM, SIGINT, SIGHUP and SIGQUIT whatever they were: the hang-up stopped
    both ranks and the stage failed with torch's SignalException traceback."""
    proc = _launch(tmp_path, ignore=(signal.SIGHUP, signal.SIGINT))
    err = _signalled_once_joined(proc, signal.SIGHUP, signal.SIGINT)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@linux_only
def test_sighup_to_the_launcher_is_one_line_and_death_by_the_signal(tmp_path):
    """The terminal closed (SIGHUP) or Ctrl-\\ (SIGQUIT): torch stopped the workers, then its SignalException went
    through run_stage as a bug's traceback and exit code 1, not as the stage stopped by the signal."""
    proc = _launch(tmp_path)
    err = _signalled_once_joined(proc, signal.SIGHUP)
    assert proc.returncode == -signal.SIGHUP, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert "stopped by SIGHUP" in err, err[-3000:]


def test_log_lines_of_a_torchrun_rank_say_which_rank_wrote_them():
    """Every rank logs (its errors, its warnings) to the same terminal: without the rank, interleaved lines from
    two ranks could not be told apart."""
    code = "import logging; from faceage.logs import setup_logging; setup_logging(); logging.getLogger('x').warning('hi')"
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    err = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stderr
    assert "[rank 1]" in err and err.rstrip().endswith("x: hi"), err
    plain = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    err = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=plain, capture_output=True, text=True,
                         check=True).stderr
    assert "rank" not in err, err


def test_a_torch_without_distributed_is_one_line_naming_the_setting(monkeypatch, tmp_path):
    """A torch build without torch.distributed (some macOS and Windows wheels): relaunch's imports of
    torch.distributed.elastic failed, and the stage ended in an ImportError traceback."""
    import torch.distributed

    from faceage.errors import FaceAgeError
    from faceage.launch import relaunch

    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(FaceAgeError) as caught:
        relaunch(2, str(tmp_path / "absent.py"), [])
    assert "train.nproc_per_node" in str(caught.value) and "torch.distributed" in str(caught.value)
