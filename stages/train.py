"""DVC stage train: fit the age model on the face crops; log the run to MLflow.

Under torchrun (``torchrun --nproc_per_node=N stages/train.py ...``, or ``--nnodes`` with a
rendezvous) every process trains its share. Run plainly with ``train.nproc_per_node > 1``, it
relaunches itself through ``torch.distributed.run`` on this machine, which is what ``dvc repro`` does.
"""

import argparse
import os
import sys

from faceage.logs import run_stage, setup_logging


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging()
    # torch, dlib, MLflow (up to tens of seconds): under run_stage here, Ctrl-C in them is one line
    from faceage.config import load_params
    from faceage.launch import LAUNCHER_PID_ENV, end_with_launcher, relaunch
    from faceage.tracking import check_reachable
    from faceage.training import check_process_count, env_int, train_model
    p = load_params(args.params).train
    check_reachable()  # a tracking server that does not answer: now, not after the data load and retries
    if "LOCAL_RANK" in os.environ:  # a torchrun worker
        end_with_launcher()
        if LAUNCHER_PID_ENV not in os.environ:  # a torchrun started by hand (relaunched: checked before the launch)
            local = env_int("LOCAL_WORLD_SIZE", 1)
            check_process_count(p, local, f"torchrun --nproc_per_node={local}", warn=os.environ["LOCAL_RANK"] == "0")
    elif p.nproc_per_node > 1:  # load_params checked the keys together too: refused before launching, not per process
        check_process_count(p, p.nproc_per_node, f"train.nproc_per_node={p.nproc_per_node}")  # GPUs, cores
        relaunch(p.nproc_per_node, __file__, argv)
        return
    train_model(p, args.faces, args.model, args.reports, args.run, args.state, embeddings_path=args.embeddings,
                detector_dir=args.detector)


if __name__ == "__main__":
    run_stage(main, interrupt_on_sigterm=True)  # a killed run ends KILLED in MLflow, as after Ctrl-C
