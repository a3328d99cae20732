"""Training on several processes of one machine: ``stages/train.py`` relaunched under torchrun.

Run plainly with ``train.nproc_per_node > 1`` (what ``dvc repro`` does), the train stage relaunches
itself through ``torch.distributed.run``'s API (:func:`relaunch`). Each torchrun worker, also under a
torchrun started by hand, first ties its life to its launcher's (:func:`end_with_launcher`).
"""

from __future__ import annotations

import os
import signal
import sys
import uuid

from faceage.errors import FaceAgeError
from faceage.logs import Terminated

# The relaunching process's PID, for its workers to tell whether it died before they could watch it.
LAUNCHER_PID_ENV = "FACEAGE_TRAIN_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SIGNALS_ENV = "TORCHELASTIC_SIGNALS_TO_HANDLE"  # the signals torch's launcher sets its handler for


class TrainProcessesFailedError(FaceAgeError):
    """A relaunched training process failed (its own log, above, says why), or could not be launched."""


def end_with_launcher() -> None:
    """A torchrun worker gets SIGTERM when its launcher dies (Linux; elsewhere nothing is done).

    torchrun starts each worker in a session of its own, so a launcher killed outright (``kill -9``, the
    OOM killer, a CI job's process group killed) left its workers training on, unseen: a rerun then resumed
    the same state beside them, both writing the state, the outputs and the MLflow run. With SIGTERM they
    end as after Ctrl-C (the MLflow run KILLED, the state kept for the rerun).
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:  # (not a stray LOCAL_RANK)
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is not None and launcher.isdigit() and os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher died before the watch began


# Why a worker died of a signal other than torchrun's own SIGTERM, as far as the signal tells.
_SIGNAL_HINTS = {
    "SIGKILL": "the out-of-memory killer, if `dmesg` says 'Out of memory' (lower train.batch_size or "
               "train.nproc_per_node), or a kill -9",
    "SIGSEGV": "a crash in native code (torch, dlib, a driver)",
    "SIGBUS": "a crash in native code, or /dev/shm too small for the data loaders (docker run --shm-size)",
    "SIGABRT": "native code aborted; its message is above",
    "SIGILL": "native code built for another CPU",
    "SIGFPE": "a crash in native code",
}


def _how(failure) -> str:
    if failure.exitcode >= 0:
        return f"exit code {failure.exitcode}"
    name = failure.signal_name()
    hint = _SIGNAL_HINTS.get(name)
    return f"killed by {name}" + (f" ({hint})" if hint else "")


def _failure_summary(error) -> str:
    """One line for torch's ChildFailedError: which rank failed, and how; the ranks torchrun then stopped
    with SIGTERM after it are named as such, not as failures of their own."""
    failures = sorted(error.failures.items())
    causes = [(rank, f) for rank, f in failures if f.exitcode != -int(signal.SIGTERM)]
    stopped = [rank for rank, f in failures if f.exitcode == -int(signal.SIGTERM)] if causes else []
    causes = causes or failures  # every rank was stopped by SIGTERM (sent from outside torchrun)
    line = "train: " + ", ".join(f"rank {rank} {_how(f)}" for rank, f in causes)
    if stopped:
        line += f"; rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped with it"
    logged = sum(f.exitcode > 0 for _, f in causes)
    if logged:
        line += f"; {'its' if logged == 1 else 'their'} log above says why"
    return line


def _signals_to_handle() -> str:
    """The signals torch's launcher may take over: those it stops the workers on (SIGTERM, SIGINT, SIGHUP,
    SIGQUIT) less those this process ignores (``nohup``'s SIGHUP, a non-interactive shell's ``cmd &``'s SIGINT
    and SIGQUIT): torch set its handler for all four whatever they were. SIGTERM always (how DVC stops it)."""
    keep = [signal.SIGTERM, *(s for s in (signal.SIGINT, getattr(signal, "SIGHUP", None),
                                          getattr(signal, "SIGQUIT", None))
                             if s is not None and signal.getsignal(s) is not signal.SIG_IGN)]
    return ",".join(s.name for s in keep)


def relaunch(nproc_per_node: int, script: str, argv: list[str]) -> None:
    """torchrun --standalone, through its API: ``nproc_per_node`` processes run ``script`` with ``argv``.

    A process that fails is one :class:`TrainProcessesFailedError` line naming it and how (the process has
    logged its error); SIGTERM, Ctrl-C, SIGHUP and SIGQUIT stop the stage as :func:`faceage.logs.run_stage` does
    (one line, death by the signal), without torch's traceback; a signal this process ignores (``nohup``) stays
    ignored.
    """
    import torch.distributed

    if not torch.distributed.is_available():
        raise TrainProcessesFailedError(f"train.nproc_per_node={nproc_per_node} needs torch.distributed, which this "
                                        "torch build lacks: set train.nproc_per_node: 1 (or install a torch with it)")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    handled = os.environ.get(SIGNALS_ENV)  # (one the user set is theirs)
    signals = handled or _signals_to_handle()
    if hasattr(config, "signals_to_handle"):  # newer torch sets the variable from its config, older reads it
        config.signals_to_handle = signals
    os.environ[SIGNALS_ENV] = signals
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        elastic_launch(config, sys.executable)("-u", script, *argv)
    except ChildFailedError as e:
        raise TrainProcessesFailedError(_failure_summary(e)) from None
    except SignalException as e:  # torch's handler, which replaced run_stage's, has stopped the workers
        signal.signal(e.sigval, signal.SIG_DFL)
        if e.sigval == signal.SIGTERM:
            raise Terminated(f"signal {int(e.sigval)}") from None
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise Terminated(f"signal {int(e.sigval)}", signum=e.sigval) from None  # SIGHUP, SIGQUIT
    finally:
        os.environ.pop(LAUNCHER_PID_ENV, None)
        if handled is None:
            os.environ.pop(SIGNALS_ENV, None)
