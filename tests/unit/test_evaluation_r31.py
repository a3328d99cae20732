"""Round-31 review of evaluation: one external set without a face stopped the whole evaluation."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from faceage.config import EvaluateParams
from faceage.evaluation import evaluate_external, external_mlflow_metrics
from faceage.external import external_maes
from faceage.sources import resolve_external
from tests.unit.test_external import checkpoint_crop, make_set, noise


class _Model:
    """A checkpoint's metadata and a model predicting 40 +- 2 for every face (evaluate_external's model)."""

    def __init__(self, crop: dict):
        self.meta = {"crop": crop, "backbone": "resnet18", "image_size": 64}

    def predict_inputs(self, images, batch_size):
        return np.full(len(images), 40.0), np.full(len(images), 2.0)


@pytest.fixture
def two_sets(detector_dir, tmp_path):
    """A set of noise and an unreadable file (no face to score) and a set with the astronaut (53 years)."""
    from skimage.data import astronaut

    empty = make_set(tmp_path / "blank", {"n.jpg": noise()})
    (empty / "test" / "x.jpg").write_bytes(b"not an image")
    with open(empty / "gt_avg_test.csv", "a") as f:
        f.write("x.jpg,0,30,0,30\n")
    faces = make_set(tmp_path / "faces", {"astronaut.jpg": astronaut()}, {"astronaut.jpg": 53.0})
    sets = resolve_external([str(empty), str(faces)], tmp_path)
    return sets, _Model(checkpoint_crop(detector_dir)), EvaluateParams(external=tuple(str(s.path) for s in sets),
                                                                        low_res=())


def test_a_set_without_a_face_is_reported_and_the_others_are_scored(two_sets, detector_dir, tmp_path, caplog):
    """One set where no face was found raised ExternalSetError: evaluate wrote nothing, not the test split's
    metrics nor the other sets', and the DVC stage failed."""
    sets, model, p = two_sets
    with caplog.at_level(logging.WARNING, logger="faceage.evaluation"):
        results, groups, rows = evaluate_external(model, sets, p, detector_dir, 30.0, tmp_path / "cache")
    assert list(results) == ["blank", "faces"]
    blank, faces = results["blank"], results["faces"]
    assert (blank["n_images"], blank["n_faces"], blank["no_face"], blank["unreadable"]) == (2, 0, 1, 1)
    assert all(math.isnan(blank[k]) for k in ("mae_years", "rmse_years", "cs5", "baseline_mae_years"))
    assert blank["mae_by_age_group"] == {} and blank["mae_low_res"] == {} and blank["sha256"]
    assert groups["blank"] == []
    assert faces["n_faces"] == 1 and faces["mae_years"] == pytest.approx(13.0)
    assert rows == [["faces", "astronaut.jpg", 53.0, 40.0, 2.0, 13.0]]
    [warning] = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.WARNING and r.name == "faceage.evaluation"]
    assert f"evaluate.external: {sets[0].given!r} (set 'blank')" in warning and "none of its 2 images has a face to score" in warning
    assert "1 without a detected face" in warning and "1 unreadable" in warning and "no MAE" in warning


def test_a_set_without_a_face_logs_its_counts_and_no_nan_mae(two_sets, detector_dir, tmp_path):
    """In MLflow the faceless set gets its counts (n_faces 0), not a NaN MAE: packaging excludes a run with a NaN
    external MAE ("blank MAE is nan"), so every run evaluated with the set was excluded and no champion chosen."""
    sets, model, p = two_sets
    results, _, _ = evaluate_external(model, sets, p, detector_dir, 30.0, tmp_path / "cache")
    flat = external_mlflow_metrics(results, p.cs_years)
    assert {k: v for k, v in flat.items() if k.startswith("external_blank_")} == {
        "external_blank_n_faces": 0, "external_blank_n_images": 2, "external_blank_no_face": 1,
        "external_blank_unreadable": 1}
    assert all(math.isfinite(v) for v in flat.values())
    assert external_maes(flat) == {"faces": pytest.approx(13.0)}
    assert json.loads(json.dumps(results))["blank"]["n_faces"] == 0  # metrics.json is written with it


def test_a_set_without_a_face_fits_the_model_card_tables(two_sets, detector_dir, tmp_path):
    from faceage.model_card import _external_table, _metrics_table

    sets, model, p = two_sets
    results, _, _ = evaluate_external(model, sets, p, detector_dir, 30.0, tmp_path / "cache")
    table = "\n".join(_external_table(results, "cs5"))
    assert "| `blank` | 2 | 0 | 1 | 1 |" in table and "| `faces` | 2 | 1 |" not in table
    metrics = {"mae_years": 5.0, "mae_real_years": 5.5, "rmse_years": 6.0, "cs5": 0.5, "baseline_mae_years": 9.0,
               "n_test_faces": 10, "external": results}
    assert any("Faces evaluated | 10 | 0 | 1" in line for line in _metrics_table(metrics, "cs5"))
