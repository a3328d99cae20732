"""DVC stage train: fit the age model on the face crops; log the run to MLflow.

Under torchrun (``torchrun --nproc_per_node=N stages/train.py ...``, or ``--nnodes`` with a
rendezvous) every process trains its share. Run plainly with ``train.nproc_per_node > 1``, it
relaunches itself through ``torch.distributed.run`` on this machine, which is what ``dvc repro`` does.
"""

import argparse
import os
import signal
import sys
import uuid

from faceage import finetune
from faceage.config import load_params
from faceage.errors import FaceAgeError
from faceage.logs import Terminated, run_stage, setup_logging
from faceage.tracking import check_reachable
from faceage.training import train_model

# The relaunching process's PID, for its workers to tell whether it died before they could watch it.
LAUNCHER_PID_ENV = "FACEAGE_TRAIN_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class TrainProcessesFailedError(FaceAgeError):
    """A relaunched training process failed; its own log (above) says why."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--faces", required=True, help="preprocess output")
    parser.add_argument("--embeddings", required=True, help="embed output (descriptors for dlib_face, chips for dlib_age)")
    parser.add_argument("--detector", required=True, help="fetch_detector output (dlib_age's pretrained network)")
    parser.add_argument("--model", required=True, help="best checkpoint (output)")
    parser.add_argument("--reports", required=True, help="folder for history.csv and metrics.json")
    parser.add_argument("--run-file", dest="run", required=True,
                        help="JSON file naming the MLflow run (output; not --run, which torchrun reads as its --run-path)")
    parser.add_argument("--state", required=True, help="resumable training state (kept only while interrupted)")
    return parser


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


def relaunch(nproc_per_node: int, argv: list[str]) -> None:
    """torchrun --standalone, through its API: ``nproc_per_node`` processes run this stage with ``argv``.

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
        elastic_launch(config, sys.executable)("-u", __file__, *argv)
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging()
    p = load_params(args.params).train
    check_reachable()  # a tracking server that does not answer: now, not after the data load and retries
    if "LOCAL_RANK" in os.environ:  # a torchrun worker
        end_with_launcher()
    elif p.nproc_per_node > 1:
        finetune.check_params(p)  # before launching: one line, not one per process (each checks again in train_model)
        relaunch(p.nproc_per_node, argv)
        return
    train_model(p, args.faces, args.model, args.reports, args.run, args.state, embeddings_path=args.embeddings,
                detector_dir=args.detector)


if __name__ == "__main__":
    run_stage(main, interrupt_on_sigterm=True)  # a killed run ends KILLED in MLflow, as after Ctrl-C
