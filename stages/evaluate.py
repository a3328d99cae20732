"""DVC stage evaluate: test-split and cross-dataset (evaluate.external) metrics and plots, logged to the MLflow run."""

import argparse

from faceage.logs import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="train output checkpoint")
    parser.add_argument("--faces", required=True, help="preprocess output")
    parser.add_argument("--embeddings", required=True, help="embed output (used by dlib_face models)")
    parser.add_argument("--run-file", dest="run", required=True, help="train's run.json (MLflow run to continue)")
    parser.add_argument("--history", required=True, help="train's history.csv (training-curve plot)")
    parser.add_argument("--data", required=True, help="fetch_data output (dataset info, gender/race labels)")
    parser.add_argument("--preprocess-metrics", required=True, help="preprocess counts JSON (for the model card)")
    parser.add_argument("--detector", required=True, help="fetch_detector output (crops the evaluate.external sets)")
    parser.add_argument("--card", required=True, help="model card (Markdown) to write")
    parser.add_argument("--out", required=True, help="folder for metrics.json, predictions and plots")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    # torch, dlib, MLflow (seconds): under run_stage here, Ctrl-C in them is one line
    from faceage.config import load_params
    from faceage.evaluation import evaluate_model
    from faceage.tracking import check_run
    p = load_params(args.params).evaluate
    check_run(args.run)  # a run this store cannot continue: said now, not after the whole evaluation
    evaluate_model(args.model, args.faces, args.out, p, run_path=args.run, history_csv=args.history,
                   embeddings_path=args.embeddings, data_dir=args.data, preprocess_metrics=args.preprocess_metrics,
                   model_card=args.card, detector_dir=args.detector)


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a CI job cancelled) cleans up as Ctrl-C does: killed outright, it left the crop
    # workers' semaphores of an external set ("leaked semaphore objects") and the set's staging folder behind.
    run_stage(main, interrupt_on_sigterm=True)
