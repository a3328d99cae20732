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


class TrainProcessesFailedError(FaceAgeError):
    """A relaunched training process failed; its own log (above) says why."""


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


def _failure_summary(error) -> str:
    """One line for torch's ChildFailedError: which ranks failed, and how."""
    parts = []
    for rank, failure in sorted(error.failures.items()):
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} {how}")
    return f"train: {len(error.failures)} training process(es) failed ({', '.join(parts)}); their log above says why"


def relaunch(nproc_per_node: int, script: str, argv: list[str]) -> None:
    """torchrun --standalone, through its API: ``nproc_per_node`` processes run ``script`` with ``argv``.

    A process that fails is one :class:`TrainProcessesFailedError` line (the process has logged its
    error); SIGTERM stops the stage as :func:`faceage.logs.run_stage` does, without torch's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
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
        raise
    finally:
        os.environ.pop(LAUNCHER_PID_ENV, None)
