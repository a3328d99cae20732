"""DVC stage preprocess: detect the subject's face in every image and write margin crops + manifest.

Stopped half-way (Ctrl-C, a kill, a full disk), it keeps the crops done so far in ``.<out>.partial`` beside
``--out``; the next run of the same job goes on from them (``faceage.preprocess``)."""

import argparse
import json
from pathlib import Path

from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="fetch_data output")
    parser.add_argument("--detector", required=True, help="fetch_detector output")
    parser.add_argument("--out", required=True, help="output folder for crops and manifest.csv (an unfinished run's work is kept beside it, "
                        "in .NAME.partial, and resumed)")
    parser.add_argument("--metrics", required=True, help="JSON file for detection counts")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    # dlib, numpy, PIL (seconds): under run_stage here, Ctrl-C in them is one line
    from faceage.atomic import write_text
    from faceage.config import load_params
    from faceage.preprocess import preprocess_dataset
    p = load_params(args.params).preprocess
    metrics = preprocess_dataset(args.data, args.detector, args.out, p)
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a SIGTERM or a full disk as it was written left half a JSON under its name
    write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a CI job cancelled) cleans up as Ctrl-C does: killed outright, it left its crop
    # workers' semaphores to the resource tracker ("5 leaked semaphore objects") and its staging folder behind.
    run_stage(main, interrupt_on_sigterm=True)
