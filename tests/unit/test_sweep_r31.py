"""Round 31's review of the sweep: the backbone table and its notes describe ``dlib_age`` with the head its
MLflow run trained (``train.head``), not the default fused head."""

import pytest

import faceage.sweep as sweep
from faceage.tracking import mlflow_env, setup_mlflow

HEAD_PARAMS = {
    # head, extra train params -> (input column, conclusion words, footnote words)
    "fused": ({"train.head": "auto"}, "64 + 150 (aligned chips)", "with dlib's face descriptor",
              "face-recognition ResNet, frozen, plus the ensemble of heads"),
    "layers": ({"train.head": "fused", "train.face_features": "layers"}, "64 + 150 (aligned chips)",
               "with three blocks of dlib's face-recognition network", "plus the ensemble of heads"),
    "ensemble": ({"train.head": "ensemble"}, "64 (aligned chips)", "an ensemble of heads trained here over it",
                 "dlib's age ResNet-10, frozen, plus the ensemble of heads"),
    "pretrained": ({"train.head": "pretrained"}, "64 (aligned chips)", "dlib's own head, fine-tuned here",
                   "dlib's age ResNet-10 with its own head, fine-tuned"),
    # head auto with a fine-tuning key is dlib's own head (faceage.config.resolve_head)
    "auto-finetune": ({"train.head": "auto", "train.freeze_blocks": "2"}, "64 (aligned chips)",
                      "dlib's own head, fine-tuned here", "with its own head, fine-tuned"),
    "zero-shot": ({"train.head": "auto", "train.epochs": "0"}, "64 (aligned chips)", "zero-shot",
                  "with its own head, as published"),
}


def log_run(mlflow, backbone: str, params: dict) -> str:
    base = {"train.backbone": backbone, "train.num_parameters": "5600000", "train.image_size": "224",
            "train.epochs": "30"}
    with mlflow.start_run() as run:
        mlflow.log_params({**base, **params})
        mlflow.log_metrics({"best_val_mae": 5.0, "test_mae_years": 5.5, "model_gflops": 0.5, "elapsed_s": 10.0})
    return run.info.run_id


@pytest.mark.parametrize("case", sorted(HEAD_PARAMS))
def test_the_report_describes_dlib_age_with_the_head_its_run_trained(tmp_path, case):
    """The input column said "64 + 150 (aligned chips)" and the notes "with dlib's face descriptor ... and
    face-recognition ResNet" for every dlib_age run: only the fused head reads the 150 px face chip."""
    params, size, words, footnote = HEAD_PARAMS[case]
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow = setup_mlflow()
        runs = {"dlib_age": {"run_id": log_run(mlflow, "dlib_age", params), "overrides": ["train.backbone=dlib_age"]},
                "dlib_face": {"run_id": log_run(mlflow, "dlib_face", {}), "overrides": ["train.backbone=dlib_face"]}}
        md = tmp_path / "backbones.md"
        sweep.write_report(sweep.collect(runs), md, tmp_path / "backbones.png", "cpu")
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `dlib_age` |"))
    assert f"| {size} |" in row
    face_row = next(line for line in text.splitlines() if line.startswith("| `dlib_face` |"))
    assert "| 150 (aligned chips) |" in face_row
    conclusion = next(line for line in text.splitlines() if line.startswith("- dlib's pretrained age network"))
    assert words in conclusion
    assert footnote in text
    assert ("`make quick` recipe" in conclusion) == (case == "fused")  # params.yaml's head, with the descriptor
    if case not in ("fused", "layers"):
        assert "64 + 150" not in text and "face descriptor" not in conclusion and "face-recognition" not in conclusion


def test_a_report_without_dlib_age_says_nothing_of_its_head(tmp_path):
    row = {"backbone": "resnet18", "run_id": "0123456789", "overrides": [], "params_m": 11.2, "gflops": 1.8,
           "image_size": 224, "epochs": 30, "train_time_s": 100.0, "val_mae": 5.0, "test_mae": 5.5, "cs5": 0.6,
           "coverage_1std": 0.7, "baseline_mae": 12.0, "external": {}}
    md = tmp_path / "backbones.md"
    sweep.write_report([row], md, tmp_path / "backbones.png", "gpu")
    assert "For `dlib_age`" not in md.read_text()


@pytest.mark.parametrize("store", ["down server", "read-only"])
def test_a_store_train_cannot_log_to_stops_the_sweep_before_its_first_run(tmp_path, monkeypatch, caplog, store):
    """With no runs recorded yet nothing checked the store: each backbone's `dvc exp run` fetched, cropped and
    embedded the data before its train stage failed on the store, and the sweep stopped there."""
    import logging
    import subprocess

    from tests.unit.test_tracking_r24 import _closed_port

    def run_profile(overrides):
        raise AssertionError(f"dvc exp run started: {overrides}")

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler
    if store == "down server":
        uri = f"http://127.0.0.1:{_closed_port()}"
    else:
        db = tmp_path / "mlflow.db"
        with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"):
            setup_mlflow()
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a file read-only for root here (chattr +i)")
        uri = f"sqlite:///{db}"
    try:
        with mlflow_env("MLFLOW_TRACKING_URI", uri), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
            assert sweep.main(["--profile", "cpu", "--backbones", "resnet18", "--runs", str(tmp_path / "r.json")]) == 1
    finally:
        if store == "read-only":
            subprocess.run(["chattr", "-i", str(db)], check=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and ("does not answer" in errors[0] or "read-only" in errors[0]), errors
