"""DVC stage train: fit the age model on the face crops; log the run to MLflow."""

import argparse

from faceage.config import load_params
from faceage.logs import run_stage, setup_logging
from faceage.training import train_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--faces", required=True, help="preprocess output")
    parser.add_argument("--embeddings", required=True, help="embed output (descriptors for dlib_face, chips for dlib_age)")
    parser.add_argument("--detector", required=True, help="fetch_detector output (dlib_age's pretrained network)")
    parser.add_argument("--model", required=True, help="best checkpoint (output)")
    parser.add_argument("--reports", required=True, help="folder for history.csv and metrics.json")
    parser.add_argument("--run", required=True, help="JSON file naming the MLflow run (output)")
    parser.add_argument("--state", required=True, help="resumable training state (kept only while interrupted)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    p = load_params(args.params).train
    train_model(p, args.faces, args.model, args.reports, args.run, args.state, embeddings_path=args.embeddings,
                detector_dir=args.detector)


if __name__ == "__main__":
    run_stage(main)
