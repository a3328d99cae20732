"""Training through the library on real faces: MLflow run contents, resume after an interruption."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
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
    assert r.data.tags["evaluate.dvc_experiment"] == ""  # evaluated outside `dvc exp run`
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
    # The headline numbers are the predictions' (no unit test runs evaluate_model): MAE, RMSE, CS@5 and the
    # baseline, which predicts the *training* split's mean age for every face (not the test split's).
    from faceage.preprocess import read_faces_manifest

    pred = np.array([float(p["predicted_age"]) for p in preds])  # written to 3 decimals
    true = np.array([float(p["true_age"]) for p in preds])
    train_mean = np.mean([float(r["apparent_age"]) for r in read_faces_manifest(tiny_run["faces"], "train")])
    assert metrics["mae_years"] == pytest.approx(np.abs(pred - true).mean(), abs=2e-3)
    assert metrics["rmse_years"] == pytest.approx(np.sqrt(((pred - true) ** 2).mean()), abs=2e-3)
    assert metrics["cs5"] == pytest.approx((np.abs(pred - true) <= 5).mean())
    assert metrics["baseline_mae_years"] == pytest.approx(np.abs(train_mean - true).mean(), abs=1e-6)
    assert abs(train_mean - true.mean()) > 0.01  # the two means differ here, so the line above has teeth
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


# Tiny runs on a handful of the sample's faces, used as they are as crops (UTKFace crops are tight face crops),
# so no detection runs. The logged MLflow model is left out to keep them short (test_tiny_run_is_tracked_in_mlflow
# covers it); everything else is the real loop and a real sqlite MLflow store.

TINY = {"backbone": "mobilenet_v3_small", "pretrained": "none", "epochs": 2, "image_size": 32, "batch_size": 4}


def _faces_folder(sample: Path, dest: Path, n_train: int = 8, n_valid: int = 4, chips: bool = False) -> Path:
    """A ``preprocess``-like folder of the sample's first faces; with ``chips``, their 64 px resizes as
    ``dlib_age``'s chips in ``dest/embeddings.npz`` (the network's input, not aligned: the tests compare runs)."""
    from PIL import Image

    from faceage.chips import CHIP_SIZE, save_chips

    rows = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        with open(sample / f"gt_avg_{split}.csv", newline="") as f:
            labels = [r for _, r in zip(range(n), csv.DictReader(f))]
        (dest / split).mkdir(parents=True)
        for r in labels:
            shutil.copyfile(sample / split / r["file_name"], dest / split / r["file_name"])
            rows.append({"split": split, "file_name": r["file_name"], "crop": f"{split}/{r['file_name']}",
                         "apparent_age": r["apparent_age_avg"], "apparent_age_std": r["apparent_age_std"],
                         "real_age": r["real_age"]})
    with open(dest / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    settings = {"margin": 0.4, "size": 200, "detector": "hog", "data_source": str(sample), "data_sha256": "d" * 64}
    (dest / "preprocess.json").write_text(json.dumps(settings))
    if chips:
        small = [np.asarray(Image.open(dest / r["crop"]).convert("RGB").resize((CHIP_SIZE, CHIP_SIZE)))
                 .transpose(2, 0, 1) for r in rows]
        save_chips(dest / "embeddings.npz", [r["crop"] for r in rows], small, 0.4, "0" * 64)
    return dest


@pytest.fixture(scope="module")
def tiny_faces(sample_dir, tmp_path_factory) -> Path:
    return _faces_folder(sample_dir, tmp_path_factory.mktemp("tiny_faces") / "faces")


def _train(mp: pytest.MonkeyPatch, root: Path, faces: Path, kill_at_eval: int = 0, **params):
    """One ``train_model`` call writing under ``root`` (MLflow: ``root/mlflow.db``); with ``kill_at_eval`` K,
    a KeyboardInterrupt (Ctrl-C, or what a SIGKILL leaves) inside the K-th validation."""
    import faceage.training as training
    from faceage.tracking import mlflow_env

    real, calls = training.evaluate, []

    def evaluate(*a, **kw):
        calls.append(1)
        if len(calls) == kill_at_eval:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    mp.setattr(training, "evaluate", evaluate)
    detector = params.pop("detector_dir", None)
    p = replace(Params().train, **{**TINY, **params})
    embeddings = faces / "embeddings.npz" if (faces / "embeddings.npz").exists() else None
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}"):
        return training.train_model(p, faces, root / "model.pt", root / "reports", root / "run.json", root / "state.pt",
                                    embeddings_path=embeddings, detector_dir=detector)


@pytest.fixture(scope="module")
def dropout_runs(tiny_faces, tmp_path_factory) -> dict[str, Path]:
    """MobileNetV3 (dropout before its last layer), 2 epochs: straight with 1 loader worker; killed in epoch 2's
    validation under commit c1 and DVC experiment killed-exp, then resumed under c2 and resumed-exp; straight
    with no worker."""
    import faceage.training as training

    out = {name: tmp_path_factory.mktemp(name) for name in ("straight", "resumed", "no_workers")}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DVC_EXP_NAME", raising=False)
        _train(mp, out["straight"], tiny_faces, num_workers=1)
        _train(mp, out["no_workers"], tiny_faces, num_workers=0)
        mp.setattr(training, "git_commit", lambda: "c1" * 20)
        mp.setenv("DVC_EXP_NAME", "killed-exp")
        with pytest.raises(KeyboardInterrupt):
            _train(mp, out["resumed"], tiny_faces, kill_at_eval=2, num_workers=1)
        assert torch.load(out["resumed"] / "state.pt", weights_only=True)["epoch"] == 1
        mp.setattr(training, "git_commit", lambda: "c2" * 20)
        mp.setenv("DVC_EXP_NAME", "resumed-exp")
        _train(mp, out["resumed"], tiny_faces, num_workers=1)
    return out


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "model.pt", weights_only=True)["state_dict"]


def test_a_dropout_network_trains_the_same_weights_resumed_or_with_no_loader_worker(dropout_runs):
    """The loader drew its workers' seed from torch's global stream, which the dropout masks draw from: once per
    process with a persistent worker, so the resumed run drew once more (210 tensors differed), and once per
    epoch with no worker (other weights than with one)."""
    straight = _weights(dropout_runs["straight"])
    history = (dropout_runs["straight"] / "reports" / "history.csv").read_text()
    differing = {other: len([k for k, w in _weights(dropout_runs[other]).items() if not torch.equal(straight[k], w)])
                 for other in ("resumed", "no_workers")}
    assert differing == {"resumed": 0, "no_workers": 0}
    for other in ("resumed", "no_workers"):
        assert (dropout_runs[other] / "reports" / "history.csv").read_text() == history, other


def test_the_lr_column_is_the_rate_each_epoch_started_with(dropout_runs):
    """It was read after the epoch's last scheduler step: the next epoch's rate, and 0 for the last epoch (cosine)."""
    from mlflow import MlflowClient

    from faceage.training import lr_factor

    p = replace(Params().train, **TINY)
    steps = 8 // 4  # 8 training faces, batch 4
    with open(dropout_runs["straight"] / "reports" / "history.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    expected = [p.lr * lr_factor((epoch - 1) * steps, steps, p) for epoch in (1, 2)]
    assert lrs == pytest.approx(expected, rel=1e-12) and lrs[-1] > 0
    assert expected[0] == p.lr / steps  # the warm-up's first step
    run_id = json.loads((dropout_runs["straight"] / "run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{dropout_runs['straight'] / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(run_id, "lr")] == pytest.approx(expected, rel=1e-12)


def test_a_run_resumed_under_another_commit_and_dvc_experiment_says_so(dropout_runs):
    """The checkpoint named the resuming commit while MLflow's tag named the first; the tag dvc_experiment kept
    the killed experiment's name, which packaging then advised to `dvc exp apply`."""
    from mlflow import MlflowClient

    from faceage.model import load_checkpoint

    _, meta = load_checkpoint(dropout_runs["resumed"] / "model.pt")
    assert meta["git_commit"] == "c1" * 20 and meta["resumed_at_commit"] == "c2" * 20
    client = MlflowClient(f"sqlite:///{dropout_runs['resumed'] / 'mlflow.db'}")
    tags = client.get_run(meta["mlflow_run_id"]).data.tags
    assert (tags["git_commit"], tags["resumed_at_commit"], tags["dvc_experiment"]) == ("c1" * 20, "c2" * 20,
                                                                                       "resumed-exp")
    _, straight = load_checkpoint(dropout_runs["straight"] / "model.pt")  # started and ended at HEAD
    assert "resumed_at_commit" not in straight


def test_a_state_whose_mlflow_run_was_deleted_continues_in_a_new_run_with_every_epoch_logged_once(
        tiny_faces, tmp_path, monkeypatch, caplog):
    """Every rerun crashed: "Cannot start run with ID ... because it is in the deleted state"."""
    from mlflow import MlflowClient

    caplog.set_level("INFO", logger="faceage")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    with pytest.raises(KeyboardInterrupt):
        _train(monkeypatch, tmp_path, tiny_faces, kill_at_eval=2, num_workers=0)
    old = torch.load(tmp_path / "state.pt", weights_only=True)["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_run(old)
    result = _train(monkeypatch, tmp_path, tiny_faces, num_workers=0)
    assert result["run_id"] != old and not (tmp_path / "state.pt").exists()
    assert f"MLflow run {old} of the training state {tmp_path / 'state.pt'} was deleted" in caplog.text
    assert "resuming from epoch 1 of 2" in caplog.text  # the training itself goes on
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["replaces_mlflow_run_id"] == old
    assert run.data.params["train.backbone"] == "mobilenet_v3_small" and run.data.tags["git_commit"]
    for key in ("val_mae", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(result["run_id"], key)] == [1, 2], key
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == result["run_id"]


def test_new_weights_at_the_same_path_start_over(tiny_faces, tmp_path, monkeypatch, caplog):
    """The fingerprint hashed train.pretrained's path, not the file: new weights there resumed the old state."""
    from faceage.model import build_model

    caplog.set_level("INFO", logger="faceage")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    weights = tmp_path / "weights.pth"
    torch.manual_seed(1)
    torch.save(build_model("mobilenet_v3_small").state_dict(), weights)
    with pytest.raises(KeyboardInterrupt):
        _train(monkeypatch, tmp_path, tiny_faces, kill_at_eval=2, num_workers=0, pretrained=str(weights))
    old = torch.load(tmp_path / "state.pt", weights_only=True)["run_id"]
    torch.manual_seed(2)
    torch.save(build_model("mobilenet_v3_small").state_dict(), weights)
    result = _train(monkeypatch, tmp_path, tiny_faces, num_workers=0, pretrained=str(weights))
    assert "resuming from epoch" not in caplog.text and "written for other params or data" in caplog.text
    assert result["run_id"] != old
    with open(tmp_path / "reports" / "history.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_after_an_ensemble_mix_the_best_epoch_keeps_its_own_mae(sample_dir, detector_dir, tmp_path, monkeypatch,
                                                                 caplog):
    """The ensemble weight 0.0 shipped the pretrained network (val MAE 5.48) and the log, metrics.json and the
    checkpoint said "best val MAE 5.48 at epoch 3" where history.csv had 24.56 for epoch 3."""
    from mlflow import MlflowClient

    from faceage.model import load_checkpoint

    caplog.set_level("INFO", logger="faceage")
    faces = _faces_folder(sample_dir, tmp_path / "faces", chips=True)
    result = _train(monkeypatch, tmp_path, faces, backbone="dlib_age", head="ensemble", pretrained="imagenet",
                    ensemble_weight=0.0, num_workers=0, detector_dir=detector_dir)
    with open(tmp_path / "reports" / "history.csv", newline="") as f:
        history = {int(r["epoch"]): float(r["val_mae"]) for r in csv.DictReader(f)}
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    _, meta = load_checkpoint(tmp_path / "model.pt")
    best = metrics["best_epoch"]
    assert history[best] == min(history.values())
    assert metrics["best_epoch_val_mae"] == meta["best_epoch_val_mae"] == history[best]
    shipped = meta["ensemble_val_mae"]
    assert metrics["best_val_mae"] == meta["val_mae"] == result["best_val_mae"] == shipped != history[best]
    assert meta["ensemble_weight"] == 0.0
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run_id"])
    assert run.data.metrics["best_epoch_val_mae"] == pytest.approx(history[best])
    assert run.data.metrics["best_val_mae"] == pytest.approx(shipped)
    assert (f"best epoch {best}: val MAE {history[best]:.2f}; shipped (ensemble weight 0.00): val MAE {shipped:.2f}"
            in caplog.text)
