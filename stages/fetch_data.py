"""DVC stage fetch_data: APPA-REAL (URL, local zip or folder) -> a validated release folder."""

import argparse

from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="output folder (the release layout)")
    parser.add_argument("--cache", help="download cache (default: .cache/downloads at the repo root, which dvc exp --temp/--queue runs share)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    # yaml, the downloader: under run_stage here, Ctrl-C in them is one line
    from faceage.appa_real import fetch_appa_real
    from faceage.config import load_params
    p = load_params(args.params).fetch_data
    fetch_appa_real(p.source, args.out, md5=p.md5, mirrors=p.mirrors, cache_dir=args.cache)


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a CI job cancelled) cleans up as Ctrl-C does (a staging folder, a download's
    # unverifiable bytes), and ends in one line, as every stage.
    run_stage(main, interrupt_on_sigterm=True)
