"""DVC stage embed: the features train.backbone reads (dlib descriptors, aligned age chips, or none)."""

import argparse

from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--faces", required=True, help="preprocess output")
    parser.add_argument("--detector", required=True, help="fetch_detector output")
    parser.add_argument("--out", required=True, help="the .npz of features")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    # dlib, numpy (seconds): under run_stage here, Ctrl-C in them is one line
    from faceage.config import load_params
    from faceage.features import compute_features
    params = load_params(args.params)
    # The one cross-section read: which backbone's features to compute.
    compute_features(params.train.backbone, args.faces, args.detector, args.out, workers=params.embed.workers)


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a CI job cancelled) cleans up as Ctrl-C does: killed outright, it left its
    # workers' semaphores to the resource tracker ("5 leaked semaphore objects").
    run_stage(main, interrupt_on_sigterm=True)
