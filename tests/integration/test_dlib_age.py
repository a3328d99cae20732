"""dlib_age end to end on real faces: embed (aligned chips) -> zero-shot, fine-tuned, ensemble-head and
fused-head train -> evaluate, tracked in MLflow, and the predictor serves evaluate's numbers for the same photos."""

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from faceage.config import Params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def age_run(tiny_run, tmp_path_factory, monkeypatch_module):
    from faceage.evaluation import evaluate_model
    from faceage.features import compute_features
    from faceage.training import train_model

    root = tmp_path_factory.mktemp("dlib_age_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)
    n = compute_features("dlib_age", tiny_run["faces"], tiny_run["detector"], root / "chips.npz", workers=1)
    p = Params()
    runs = {}
    for name, overrides in {"zero_shot": {"epochs": 0},
                            "tuned": {"epochs": 2, "lr": 1e-4, "distill_weight": 1.0, "wise_ft": True,
                                      "layer_lr_decay": 0.5, "freeze_blocks": 1},
                            "ensemble": {"epochs": 30, "head": "ensemble"},
                            "fused": {"epochs": 30}}.items():  # train.head=auto, nothing else: the fused ensemble
        out = root / name
        tp = replace(p.train, backbone="dlib_age", batch_size=16, **overrides)
        result = train_model(tp, tiny_run["faces"], out / "model.pt", out / "reports", out / "run.json",
                             out / "state.pt", embeddings_path=root / "chips.npz", detector_dir=tiny_run["detector"])
        # The 12 utk-external faces of tiny_run: their chips are cut and cached beside the set's crops.
        metrics = evaluate_model(out / "model.pt", tiny_run["faces"], out / "eval",
                                 replace(p.evaluate, external=(str(tiny_run["external"]),)), run_path=out / "run.json",
                                 embeddings_path=root / "chips.npz", data_dir=tiny_run["data"],
                                 detector_dir=tiny_run["detector"], external_cache=root / "external-cache")
        runs[name] = {"dir": out, "result": result, "metrics": metrics}
    return {"root": root, "n": n, "uri": uri, "runs": runs, **{k: tiny_run[k] for k in ("faces", "detector", "data")}}


def test_chips_cover_every_crop(age_run):
    with np.load(age_run["root"] / "chips.npz") as z:
        assert z["chips"].shape == (age_run["n"], 3, 64, 64) and z["chips"].dtype == np.uint8
        assert z["face_chips"].shape == (age_run["n"], 3, 150, 150) and z["face_chips"].dtype == np.uint8
    [cache] = list((age_run["root"] / "external-cache").glob("utk_external-*"))  # not the lock files beside
    with np.load(cache / "chips.npz") as z:
        n_ext = age_run["runs"]["zero_shot"]["metrics"]["external"]["utk_external"]["n_faces"]
        assert z["chips"].shape == (n_ext, 3, 64, 64) and z["face_chips"].shape == (n_ext, 3, 150, 150)


def test_zero_shot_and_fine_tuned_runs_are_evaluated_and_tracked(age_run):
    from mlflow import MlflowClient

    client = MlflowClient(age_run["uri"])
    for name, run in age_run["runs"].items():
        m = run["metrics"]
        # The pretrained network is a real age model: far better than chance even on 16 faces.
        assert 0 < m["mae_years"] < 15, name
        tracked = client.get_run(run["result"]["run_id"]).data
        assert tracked.metrics["test_mae_years"] == pytest.approx(m["mae_years"]), name
        assert tracked.params["train.backbone"] == "dlib_age"
        ext = m["external"]["utk_external"]
        assert ext["n_faces"] >= 8 and 0 < ext["mae_years"] < 25, name
        assert tracked.metrics["external_utk_external_mae"] == pytest.approx(ext["mae_years"]), name
    assert age_run["runs"]["zero_shot"]["result"]["best_epoch"] == 0
    tuned = client.get_run(age_run["runs"]["tuned"]["result"]["run_id"]).data.metrics
    assert 0.0 <= tuned["wise_alpha"] <= 1.0


def test_auto_head_is_the_fused_ensemble_with_both_networks_left_as_dlib_shipped_them(age_run, tiny_run):
    from faceage.detector import AGE_MODEL_FILE, RECOGNITION_FILE
    from faceage.dlib_age import HEAD_ENSEMBLE, HEAD_FUSED, HEAD_PRETRAINED, load_dlib_age
    from faceage.face_net import face_net_state_dict
    from faceage.model import load_checkpoint

    heads = {name: load_checkpoint(run["dir"] / "model.pt")[1].get("head") for name, run in age_run["runs"].items()}
    assert heads == {"zero_shot": HEAD_PRETRAINED, "tuned": HEAD_PRETRAINED, "ensemble": HEAD_ENSEMBLE,
                     "fused": HEAD_FUSED}
    dlib = load_dlib_age(tiny_run["detector"] / AGE_MODEL_FILE, 101).state_dict()
    face = face_net_state_dict(tiny_run["detector"] / RECOGNITION_FILE)
    for name in ("ensemble", "fused"):
        model, meta = load_checkpoint(age_run["runs"][name]["dir"] / "model.pt")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in dlib.items())  # frozen: only the ensemble trained
        assert not torch.equal(model.ensemble.in_std, torch.ones_like(model.ensemble.in_std))  # standardised on train
    assert meta["input"] == "dlib_chip_pair"
    assert all(torch.equal(model.face.state_dict()[k], v) for k, v in face.items())  # dlib's face network, frozen


@pytest.mark.parametrize("name", ["tuned", "ensemble", "fused"])
def test_predictor_serves_what_evaluate_scored(age_run, name):
    """detect -> crop -> 5-point chip -> network: the photo gets evaluate's exact prediction."""
    from faceage.images import load_image
    from faceage.predict import AgePredictor
    from faceage.preprocess import read_faces_manifest

    run = age_run["runs"][name]["dir"]
    with open(run / "eval" / "predictions.csv") as f:
        scored = {r["file_name"]: float(r["predicted_age"]) for r in csv.DictReader(f)}
    rows = [r for r in read_faces_manifest(age_run["faces"], "test") if r["status"] == "face" and r["n_faces"] == "1"]
    assert rows, "the tiny test split has detected faces"
    predictor = AgePredictor(run / "model.pt", age_run["detector"], threads=1)
    for r in rows[:4]:
        faces = predictor.predict(load_image(age_run["data"] / "test" / r["file_name"]))
        assert len(faces) == 1
        assert faces[0].age == pytest.approx(scored[r["file_name"]], abs=1e-3)
    assert predictor.lineage()["backbone"] == "dlib_age"
