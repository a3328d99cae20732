"""Package the champion: best finished MLflow run -> registry face-age@champion -> BentoML model face_age.

Reads the tracking store from $MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db of the repo)
and writes to the BentoML store ($BENTOML_HOME). `make bento` runs this, then `bentoml build`.
"""

import argparse
import json
import logging
from pathlib import Path

from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    # torch, MLflow, BentoML (seconds): imported under run_stage (main calls this), Ctrl-C in them is one line
    from faceage.packaging import BENTO_MODEL, REGISTERED_MODEL
    from faceage.sources import EXTERNAL_FILE

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/model.pt", help="the winner's checkpoint (train output)")
    parser.add_argument("--detector", default="models/detector", help="fetch_detector output folder")
    parser.add_argument("--faces", default="data/faces", help="preprocess output: real crops to check the ONNX export on")
    parser.add_argument("--registered-model", default=REGISTERED_MODEL, help="MLflow registry name")
    parser.add_argument("--bento-model", default=BENTO_MODEL, help="BentoML model name")
    parser.add_argument("--external", help="check_sources' record of the evaluate.external sets: the versions "
                                               "the guard compares (default: the one beside --faces, "
                                               f"{EXTERNAL_FILE}; ignored where absent)")
    parser.add_argument("--card", default="reports/model_card.md",
                        help="the workspace's model card (evaluate output): packaging warns where it describes a "
                             "run other than the packaged one (the packaged model carries its run's own card)")
    parser.add_argument("--out", help="also write the packaged model's lineage to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    from faceage.packaging import package_champion  # imported by build_parser
    if args.out:  # before the work: a folder that is not there failed after the registry and the store had changed
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from faceage.atomic import write_text
    summary = package_champion(args.model, args.detector, args.faces, registered_model=args.registered_model,
                               bento_model=args.bento_model, external_record=args.external,
                               workspace_card=args.card)
    if args.out:  # whole or not at all: a killed or failed write left a truncated JSON in place of the last one
        write_text(args.out, json.dumps(summary, indent=2) + "\n")
    card = summary.get("model_card_path")
    logging.getLogger("faceage").info("packaged %s: %s@champion version %s; its model card: %s", summary["bento_model"],
                                      summary["registered_model"], summary["registered_version"],
                                      card or "none (the warning above says why)")


if __name__ == "__main__":
    # SIGTERM (`timeout`, a CI job cancelled) cleans up as Ctrl-C does: killed outright, packaging left its
    # temporary folders (the downloaded checkpoint, the staged model: up to ~125 MB) in the temp folder.
    run_stage(main, interrupt_on_sigterm=True)
