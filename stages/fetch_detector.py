"""DVC stage fetch_detector: dlib model files + sha256 manifest, for preprocess and the service."""

import argparse

from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="output folder for the model files")
    parser.add_argument("--cache", help="download cache (default: .cache/downloads at the repo root, which dvc exp --temp/--queue runs share)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    # yaml, dlib: under run_stage here, Ctrl-C in them is one line
    from faceage.config import load_params
    from faceage.detector import fetch_detector_files
    p = load_params(args.params).fetch_detector
    fetch_detector_files(p.source, args.out, cache_dir=args.cache)


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a CI job cancelled) cleans up as Ctrl-C does (a half-decompressed model file),
    # and ends in one line, as every stage.
    run_stage(main, interrupt_on_sigterm=True)
