"""DVC stage embed: dlib face descriptors of every crop, computed once and reused by dlib_face experiments."""

import argparse

from faceage.config import load_params
from faceage.face_encoder import embed_dataset
from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--faces", required=True, help="preprocess output")
    parser.add_argument("--detector", required=True, help="fetch_detector output")
    parser.add_argument("--out", required=True, help="the .npz of descriptors")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    p = load_params(args.params).embed
    embed_dataset(args.faces, args.detector, args.out, workers=p.workers)


if __name__ == "__main__":
    run_stage(main)
