"""Training through the library on real faces: MLflow run contents, resume after an interruption."""

import csv
import json
from dataclasses import replace

import pytest
import torch

from faceage.config import ConfigError, Params
from faceage.evaluation import age_group

pytestmark = pytest.mark.integration


def test_tiny_run_is_tracked_in_mlflow(tiny_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tiny_run["tracking_uri"])
    run_id = json.loads(tiny_run["run"].read_text())["run_id"]
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["train.backbone"] == "resnet18" and r.data.params["train.pretrained"] == "none"
    assert r.data.tags["git_commit"] and len(r.data.tags["data_sha256"]) == 64
    assert {"best_val_mae", "test_mae_years", "test_cs5", "test_mae_real_years"} <= set(r.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "model_summary.txt", "evaluation"} <= artifacts
    models = client.search_logged_models([r.info.experiment_id])
    assert [m.source_run_id for m in models if m.name == "model"] == [run_id]
    # The logged model is a usable network: a batch of images of any size in, 101 logits out
    # (an example of one image made torch.export fix the batch at 1), also through pyfunc.
    import mlflow.pyfunc
    import mlflow.pytorch
    import numpy as np

    from faceage.tracking import mlflow_env

    with mlflow_env("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"]):  # models:/ URIs resolve in the run's store
        net = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
        for n in (1, 3):
            assert net(torch.zeros(n, 3, 64, 64)).shape == (n, 101)
        served = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
        assert np.asarray(served.predict(np.zeros((5, 3, 64, 64), np.float32))).shape == (5, 101)


def test_checkpoint_describes_itself(tiny_run):
    from faceage.detector import read_manifest
    from faceage.model import load_checkpoint

    _, meta = load_checkpoint(tiny_run["model"])
    assert meta["backbone"] == "resnet18" and meta["image_size"] == 64
    assert meta["crop"]["margin"] == 0.4 and meta["crop"]["detector"] == "hog"
    assert meta["crop"]["detector_sha256"] == read_manifest(tiny_run["detector"])["files"]["frontal_face_detector.svm"]
    assert (meta["min_age"], meta["max_age"]) == (0, 100)


def test_interrupted_training_resumes_in_the_same_mlflow_run_with_the_uninterrupted_results(
        tiny_run, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="faceage")
    from mlflow import MlflowClient

    import faceage.training as training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = replace(Params().train, pretrained="none", epochs=2, image_size=48, batch_size=16)
    out = {name: tmp_path / name for name in ("resumed", "straight")}
    args = {name: (p, tiny_run["faces"], d / "model.pt", d / "reports", d / "run.json", d / "state.pt")
            for name, d in out.items()}
    training.train_model(*args["straight"])
    real_loss, calls = training.age_loss, []

    def interrupt_mid_epoch_two(*a, **kw):
        calls.append(1)
        if len(calls) == 6:  # 64 faces / batch 16 = 4 steps per epoch: step 2 of epoch 2
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real_loss(*a, **kw)

    monkeypatch.setattr(training, "age_loss", interrupt_mid_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        training.train_model(*args["resumed"])
    state_path = out["resumed"] / "state.pt"
    assert state_path.exists() and not (out["resumed"] / "model.pt").exists()
    state = torch.load(state_path, weights_only=True)
    assert state["epoch"] == 1
    client = MlflowClient()
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    monkeypatch.setattr(training, "age_loss", real_loss)
    result = training.train_model(*args["resumed"])
    assert result["run_id"] == state["run_id"]
    assert not state_path.exists()
    assert [m.step for m in client.get_metric_history(state["run_id"], "val_mae")] == [1, 2]
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
    assert "resuming from epoch 1 of 2" in caplog.text
    # Exact: the same history and weights as the run that was never interrupted.
    history = {name: (d / "reports" / "history.csv").read_text() for name, d in out.items()}
    assert history["resumed"].count("\n") == 3 and history["resumed"] == history["straight"]
    weights = {name: torch.load(d / "model.pt", weights_only=True)["state_dict"] for name, d in out.items()}
    assert all(torch.equal(weights["resumed"][k], weights["straight"][k]) for k in weights["straight"])
    assert (out["resumed"] / "reports" / "model_summary.txt").exists()


def test_model_card_numbers_match_the_metrics(tiny_run):
    metrics = json.loads((tiny_run["eval"] / "metrics.json").read_text())
    card = tiny_run["model_card"].read_text()
    assert f"| MAE, apparent age (years) | {metrics['mae_years']:.2f} |" in card
    assert f"| RMSE (years) | {metrics['rmse_years']:.2f} |" in card
    assert f"within 1 std: {metrics['coverage_1std']:.3f}" in card
    for group, mae in metrics["mae_by_age_group"].items():
        assert f"| {group} | " in card and f" | {mae:.2f} |" in card
    # by_age_group.csv's mean signed error is the predictions' and the card shows it beside the MAE.
    with open(tiny_run["eval"] / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    with open(tiny_run["eval"] / "by_age_group.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["age_group"] for r in rows] == list(metrics["mae_by_age_group"])
    for r in rows:
        diff = [float(p["predicted_age"]) - float(p["true_age"]) for p in preds
                if age_group(float(p["true_age"])) == r["age_group"]]
        assert int(r["n"]) == len(diff) and float(r["bias_years"]) == pytest.approx(sum(diff) / len(diff), abs=2e-3)
        assert f"| {r['age_group']} | {r['n']} | {float(r['mae_years']):.2f} | {float(r['bias_years']):+.2f} |" in card
    worst = max(rows, key=lambda r: abs(float(r["bias_years"])))
    side = "old" if float(worst["bias_years"]) >= 0 else "young"
    assert (f"on the test split, faces of {worst['age_group']} are predicted {abs(float(worst['bias_years'])):.2f} "
            f"years too {side} ({worst['n']} faces)") in card
    # The sample carries UTKFace gender/race labels: the card breaks errors down by them.
    assert "### By gender" in card and "### By race" in card
    assert set(metrics["mae_by_gender"]) <= {"female", "male"}
    run_id = json.loads(tiny_run["run"].read_text())["run_id"]
    assert f"MLflow run `{run_id}`" in card


def test_zero_epochs_ship_the_seeded_initial_weights(tiny_run, tmp_path, monkeypatch):
    """``train.epochs=0`` (zero-shot): no epoch runs, the checkpoint holds the initial weights, scored on validation."""
    import faceage.training as training
    from faceage.data import load_split
    from faceage.inference import input_fn
    from faceage.inputs import backbone_input
    from faceage.model import IMAGENET_MEAN, IMAGENET_STD, build_model, load_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = replace(Params().train, pretrained="none", epochs=0, image_size=48, batch_size=16, device="cpu")
    result = training.train_model(p, tiny_run["faces"], tmp_path / "model.pt", tmp_path / "reports",
                                  tmp_path / "run.json", tmp_path / "state.pt")
    assert result["best_epoch"] == 0 and result["epochs"] == 0
    assert (tmp_path / "reports" / "history.csv").read_text().strip() == ",".join(training.HISTORY_COLUMNS)
    torch.manual_seed(p.seed)
    initial = build_model(p.backbone)
    _, meta = load_checkpoint(tmp_path / "model.pt")
    weights = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], v) for k, v in initial.state_dict().items())
    val = load_split(tiny_run["faces"], "valid", p.backbone, p.image_size)
    expected = training.evaluate(initial, val, input_fn(backbone_input(p.backbone), IMAGENET_MEAN, IMAGENET_STD), torch.device("cpu"))
    assert meta["val_mae"] == result["best_val_mae"] == expected


def test_a_recipe_row_trains_and_is_scored_with_the_default_params(tiny_run, tmp_path):
    """`python -m faceage.recipe` trained its first variant, then evaluate refused the default
    evaluate.external without a detector folder: every recipe run died after its first training."""
    from faceage.recipe import _run
    from faceage.tracking import mlflow_env

    base = {"backbone": "resnet18", "pretrained": "none", "image_size": 64, "batch_size": 16}
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):  # not the packaged run's store
        row = _run("resnet18 tiny", Params(), {"epochs": 1}, base, tmp_path, tiny_run["faces"],
                   tmp_path / "embeddings.npz", tiny_run["data"], detector=tiny_run["detector"])
    assert row["test_mae"] > 0 and row["val_mae"] > 0 and len(row["run_id"]) == 32
    assert (tmp_path / "resnet18_tiny" / "eval" / "metrics.json").is_file()


def test_a_run_whose_weights_turn_to_nan_stops_and_ships_nothing(tiny_run, tmp_path, monkeypatch):
    """A NaN loss went on epoch after epoch; val MAE NaN never beat inf, so the final NaN weights were
    shipped with best_val_mae inf and the stage succeeded. Real training, its loss made NaN at epoch 2."""
    import faceage.training as training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    real_loss, calls = training.age_loss, []

    def nan_from_epoch_two(*a, **kw):
        calls.append(1)
        loss = real_loss(*a, **kw)
        return loss * float("nan") if len(calls) > 4 else loss  # 64 faces / batch 16: 4 steps an epoch

    monkeypatch.setattr(training, "age_loss", nan_from_epoch_two)
    p = replace(Params().train, pretrained="none", epochs=3, image_size=48, batch_size=16)
    with pytest.raises(training.TrainingDivergedError, match=r"epoch 2: training loss nan"):
        training.train_model(p, tiny_run["faces"], tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                             tmp_path / "state.pt")
    assert not (tmp_path / "model.pt").exists()
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 1  # the last good epoch stays


def test_a_training_split_of_one_face_is_a_clear_error(tiny_run, tmp_path, monkeypatch):
    """One face made a batch of one, and BatchNorm failed inside torch ("Expected more than 1 value per channel")."""
    import shutil

    import pandas as pd

    import faceage.training as training
    from faceage.errors import FaceAgeError

    faces = tmp_path / "faces"
    shutil.copytree(tiny_run["faces"], faces)
    manifest = pd.read_csv(faces / "manifest.csv")
    first_train = manifest.index[manifest["split"] == "train"][0]
    manifest[(manifest["split"] != "train") | (manifest.index == first_train)].to_csv(faces / "manifest.csv", index=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = replace(Params().train, pretrained="none", epochs=1, image_size=48, batch_size=16)
    with pytest.raises(FaceAgeError, match=r"train: 1 training face\(s\) .* at least 2"):
        training.train_model(p, faces, tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                             tmp_path / "state.pt")
    assert not (tmp_path / "model.pt").exists()


def test_a_backbone_that_cannot_take_the_image_size_fails_before_the_data_load(tiny_run, tmp_path, monkeypatch):
    import faceage.training as training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(training, "load_split", lambda *a, **k: pytest.fail("the data loaded first"))
    p = replace(Params().train, backbone="vit_b_32", pretrained="none", epochs=1, image_size=112)
    with pytest.raises(ConfigError, match="train.image_size=112 does not fit train.backbone='vit_b_32'"):
        training.train_model(p, tiny_run["faces"], tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                             tmp_path / "state.pt")
