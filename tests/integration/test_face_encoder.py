"""dlib_face end to end on real faces: embed stage -> train -> evaluate, and the predictor serves the same numbers."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from faceage.config import Params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dlib_run(tiny_run, tmp_path_factory, monkeypatch_module):
    from faceage.evaluation import evaluate_model
    from faceage.face_encoder import embed_dataset
    from faceage.training import train_model

    root = tmp_path_factory.mktemp("dlib_run")
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    n = embed_dataset(tiny_run["faces"], tiny_run["detector"], root / "emb.npz", workers=1)
    p = Params()
    tp = replace(p.train, backbone="dlib_face", epochs=3, batch_size=16)
    train_model(tp, tiny_run["faces"], root / "model.pt", root / "reports", root / "run.json", root / "state.pt",
                embeddings_path=root / "emb.npz")
    # The same 12 utk-external faces as tiny_run, in their own cache: the dlib_face descriptors
    # of an external set are computed (and cached) beside its crops.
    metrics = evaluate_model(root / "model.pt", tiny_run["faces"], root / "eval",
                             replace(p.evaluate, external=(str(tiny_run["external"]),)),
                             embeddings_path=root / "emb.npz", detector_dir=tiny_run["detector"],
                             external_cache=root / "external-cache")
    return {"root": root, "n": n, "metrics": metrics, **{k: tiny_run[k] for k in ("faces", "detector", "data")}}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_embeddings_cover_every_crop_with_both_views(dlib_run):
    with np.load(dlib_run["root"] / "emb.npz") as z:
        assert z["embeddings"].shape == (dlib_run["n"], 2, 128)
        assert len(set(z["crops"].tolist())) == dlib_run["n"]
    m = dlib_run["metrics"]
    with open(dlib_run["root"] / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    err = np.array([float(r["abs_error"]) for r in rows])
    std = np.array([float(r["predicted_std"]) for r in rows])
    assert m["mae_years"] == pytest.approx(err.mean(), abs=1e-3)
    assert m["coverage_1std"] == pytest.approx((err <= std).mean(), abs=1.5 / len(rows))  # the csv rounds to 1e-3
    # The external set's descriptors were computed beside its cached crops, with both views.
    [cache] = list((dlib_run["root"] / "external-cache").glob("utk_external-*"))  # not the lock files beside
    [descriptors] = list(cache.glob("embeddings-*.npz"))  # one file, keyed by the code and the face-network files
    with np.load(descriptors) as z:
        assert z["embeddings"].shape == (m["external"]["utk_external"]["n_faces"], 2, 128)


def test_predictor_serves_what_evaluate_scored(dlib_run):
    """The photo goes through detect -> crop -> embed -> head and gets evaluate's exact prediction."""
    from faceage.images import load_image
    from faceage.predict import AgePredictor
    from faceage.preprocess import read_faces_manifest

    with open(dlib_run["root"] / "eval" / "predictions.csv") as f:
        scored = {r["file_name"]: float(r["predicted_age"]) for r in csv.DictReader(f)}
    rows = [r for r in read_faces_manifest(dlib_run["faces"], "test") if r["status"] == "face" and r["n_faces"] == "1"]
    assert rows, "the tiny test split has detected faces"
    predictor = AgePredictor(dlib_run["root"] / "model.pt", dlib_run["detector"])
    for r in rows[:4]:
        faces = predictor.predict(load_image(dlib_run["data"] / "test" / r["file_name"]))
        assert len(faces) == 1
        assert faces[0].box == (int(r["left"]), int(r["top"]), int(r["right"]), int(r["bottom"]))
        assert faces[0].age == pytest.approx(scored[r["file_name"]], abs=1e-3)
        assert faces[0].age_std > 0
    lineage = json.dumps(predictor.lineage())
    assert "dlib_face" in lineage
