"""Round 37: an evaluate that fails or is stopped part-way leaves the previous metrics.json, not a new one.

evaluate wrote ``metrics.json`` first, then the predictions, the model card, the plots, and logged to MLflow last:
one failing (or stopped: stages/evaluate.py turns SIGTERM into Ctrl-C) after that first write left a new
``metrics.json`` with the previous predictions and card, nothing in MLflow, and ``dvc metrics show`` showed it as a
finished evaluation. Real evaluations of the session's tiny trained checkpoint; the later write fails for real (a
folder where an output goes, a run deleted from the MLflow store).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

PREVIOUS_METRICS = '{"mae_years": 99.0, "from": "the previous complete evaluation"}\n'
PREVIOUS_PREDICTIONS = "file_name,true_age\nprevious.jpg,1\n"
PREVIOUS_CARD = "# the previous model card\n"


@pytest.fixture
def previous(tmp_path) -> dict[str, Path]:
    """An output folder and model card holding a previous complete evaluation's files (told apart by content: the
    same checkpoint evaluated again gives the same numbers), with the .gitignore DVC writes beside its outputs."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(PREVIOUS_METRICS)
    (out / "predictions.csv").write_text(PREVIOUS_PREDICTIONS)
    (out / ".gitignore").write_text("/metrics.json\n/predictions.csv\n")
    card = tmp_path / "reports" / "model_card.md"  # a folder of its own: MLflow's store puts a lock in tmp_path
    card.parent.mkdir()
    card.write_text(PREVIOUS_CARD)
    return {"out": out, "card": card}


def _evaluate(tiny_run, out: Path, card: Path, run_path: Path | None = None) -> dict:
    """evaluate_model as the stage calls it (no external set: the test split is what is written)."""
    from faceage.config import Params
    from faceage.evaluation import evaluate_model

    root = tiny_run["root"]
    return evaluate_model(tiny_run["model"], tiny_run["faces"], out, replace(Params().evaluate, external=()),
                          run_path=run_path, history_csv=root / "reports" / "history.csv", data_dir=tiny_run["data"],
                          preprocess_metrics=root / "preprocess.json", model_card=card)


def _leftovers(folder: Path) -> list[str]:
    """Hidden staging files or folders left in ``folder`` (DVC's .gitignore aside)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".gitignore")


@pytest.mark.parametrize("blocked", ["predictions.csv", "training_curves.png", "card"])
def test_a_write_failing_after_the_metrics_leaves_the_previous_metrics_json(tiny_run, previous, blocked):
    """A folder where one output goes (the predictions, a plot, the model card): that write fails after the metrics
    were computed. metrics.json stays the previous one, and no staging files are left behind."""
    out, card = previous["out"], previous["card"]
    target = card if blocked == "card" else out / blocked
    target.unlink(missing_ok=True)
    target.mkdir()
    (target / "someone's file").write_text("kept")
    with pytest.raises(IsADirectoryError):
        _evaluate(tiny_run, out, card)
    assert (out / "metrics.json").read_text() == PREVIOUS_METRICS
    assert (target / "someone's file").read_text() == "kept"
    assert _leftovers(out) == [] and _leftovers(card.parent) == []


def _own_run(tmp_path: Path) -> tuple[str, Path, str]:
    """A finished MLflow run in a store of this test's own (artifacts under tmp_path), and train's run.json for it:
    (tracking URI, run.json, run id)."""
    from mlflow.tracking import MlflowClient

    from faceage.tracking import EXPERIMENT, write_run_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    client.set_terminated(run_id)
    write_run_file(tmp_path / "run.json", run_id, experiment_id)
    return uri, tmp_path / "run.json", run_id


def test_mlflow_logging_failing_leaves_the_previous_evaluation_whole(tiny_run, previous, tmp_path):
    """train's run deleted from the store while evaluate ran (`mlflow runs delete`, the UI): logging fails at the
    end. Before, metrics.json was already the new one, with nothing in MLflow; now the workspace keeps the previous
    evaluation whole (metrics, predictions, card), for a rerun to replace."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from faceage.tracking import mlflow_env

    out, card = previous["out"], previous["card"]
    uri, run_file, run_id = _own_run(tmp_path)
    MlflowClient(uri).delete_run(run_id)
    with mlflow_env("MLFLOW_TRACKING_URI", uri), pytest.raises(MlflowException):
        _evaluate(tiny_run, out, card, run_path=run_file)
    assert (out / "metrics.json").read_text() == PREVIOUS_METRICS
    assert (out / "predictions.csv").read_text() == PREVIOUS_PREDICTIONS
    assert card.read_text() == PREVIOUS_CARD
    assert _leftovers(out) == [] and _leftovers(card.parent) == []


def test_a_complete_evaluation_replaces_every_output_and_logs_them(tiny_run, previous, tmp_path):
    """The order of the writes changed, not what they hold: every output is the new one, metrics.json is the
    returned metrics, MLflow has the files under evaluation/ and the metrics; DVC's .gitignore in the folder stays."""
    from mlflow.tracking import MlflowClient

    from faceage.tracking import mlflow_env

    out, card = previous["out"], previous["card"]
    uri, run_file, run_id = _own_run(tmp_path)
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        metrics = _evaluate(tiny_run, out, card, run_path=run_file)
    assert (out / "metrics.json").read_text() == json.dumps(metrics, indent=2) + "\n"
    with open(out / "predictions.csv", newline="") as f:
        assert len(f.read().splitlines()) == metrics["n_test_faces"] + 1
    assert card.read_text().startswith("# Model card: FaceAge")
    assert (out / ".gitignore").read_text() == "/metrics.json\n/predictions.csv\n"
    assert _leftovers(out) == [] and _leftovers(card.parent) == []
    written = {"metrics.json", "predictions.csv", "external_predictions.csv", "by_age_group.csv", "pred_vs_true.png",
               "error_by_age_group.png", "training_curves.png"}
    assert written <= {p.name for p in out.iterdir()}
    client = MlflowClient(uri)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    assert logged == written | {"model_card.md"}
    run = client.get_run(run_id)
    assert run.data.metrics["test_mae_years"] == pytest.approx(metrics["mae_years"])
    assert run.info.status == "FINISHED"
    # What MLflow holds is what the workspace holds
    assert Path(client.download_artifacts(run_id, "evaluation/metrics.json", str(tmp_path / "dl"))).read_text() == \
        (out / "metrics.json").read_text()
