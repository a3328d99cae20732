"""evaluate.external on real faces: 12 utk-external photos scored by the tiny run's model.

The numbers are checked against the per-face predictions, MLflow and the model card, and each
prediction against what the service's predictor gives for the same photo (one crop path, one model).
"""

import csv
import json

import numpy as np
import pytest

from faceage.evaluation import errors_by_group

pytestmark = pytest.mark.integration

NAME = "utk_external"


@pytest.fixture(scope="module")
def scored(tiny_run):
    metrics = json.loads((tiny_run["eval"] / "metrics.json").read_text())
    with open(tiny_run["eval"] / "external_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return metrics, rows


def test_external_metrics_follow_the_predictions(tiny_run, scored):
    metrics, rows = scored
    m = metrics["external"][NAME]
    assert m["n_images"] == 12 and m["n_faces"] == len(rows) > 0
    assert m["n_faces"] + m["no_face"] + m["unreadable"] == 12  # no release crops to fall back on
    assert {r["set"] for r in rows} == {NAME}
    pred = np.array([float(r["predicted_age"]) for r in rows])
    true = np.array([float(r["true_age"]) for r in rows])
    assert m["mae_years"] == pytest.approx(np.abs(pred - true).mean(), abs=2e-3)  # predictions.csv rounds to 1e-3
    assert m["cs5"] == pytest.approx((np.abs(pred - true) <= 5).mean(), abs=1 / len(rows))
    assert m["mae_by_age_group"] == pytest.approx({g["group"]: g["mae_years"] for g in errors_by_group(pred, true)},
                                                  abs=2e-3)
    with open(tiny_run["external"] / "gt_avg_test.csv", newline="") as f:
        ages = {r["file_name"]: r["apparent_age_avg"] for r in csv.DictReader(f)}
    assert all(a.endswith(".6") for a in ages.values())  # the fixture's fractional ages
    assert all(float(ages[r["file_name"]]) == float(r["true_age"]) for r in rows)
    assert all(r["true_age"] == ages[r["file_name"]] for r in rows)  # as written, not float32's 24.600000381469727


def test_external_metrics_are_in_mlflow_and_the_model_card(tiny_run, scored):
    from mlflow import MlflowClient

    metrics, _ = scored
    m = metrics["external"][NAME]
    run_id = json.loads(tiny_run["run"].read_text())["run_id"]
    logged = MlflowClient(tiny_run["tracking_uri"]).get_run(run_id).data
    assert logged.metrics[f"external_{NAME}_mae"] == pytest.approx(m["mae_years"])
    assert logged.metrics[f"external_{NAME}_cs5"] == pytest.approx(m["cs5"])
    assert logged.metrics[f"external_{NAME}_no_face"] == m["no_face"] == m["n_images"] - m["n_faces"] - m["unreadable"]
    assert json.loads(logged.tags["evaluate.external"]) == [str(tiny_run["external"])]
    from faceage.appa_real import dataset_fingerprint
    from faceage.external import external_versions

    # which files the MAE was measured on: the champion guard compares MAEs only within one version of a set
    assert external_versions(logged.tags) == {NAME: dataset_fingerprint(tiny_run["external"])} == {NAME: m["sha256"]}
    assert set(m["mae_low_res"]) == {"0.75", "0.5"}  # evaluate.low_res's defaults
    assert all(logged.metrics[f"external_{NAME}_mae_low_res_{f}"] == pytest.approx(v)
               for f, v in m["mae_low_res"].items())
    assert all(logged.metrics[f"test_mae_low_res_{f}"] == pytest.approx(v) for f, v in metrics["mae_low_res"].items())
    card = tiny_run["model_card"].read_text()
    assert "## Cross-dataset test sets" in card
    # The headline table: the set's numbers in a column beside the test split's.
    assert f"| metric | test split | `{NAME}` |" in card
    assert f"| MAE, apparent age (years) | {metrics['mae_years']:.2f} | {m['mae_years']:.2f} |" in card
    assert "## Smaller faces" in card
    assert (f"| `{NAME}` | {m['mae_years']:.2f} | {m['mae_low_res']['0.75']:.2f} | "
            f"{m['mae_low_res']['0.5']:.2f} |") in card
    assert (f"| `{NAME}` | 12 | {m['n_faces']} | {m['no_face']} | {m['unreadable']} | {m['mae_years']:.2f} | "
            f"{m['rmse_years']:.2f} | {m['cs5']:.3f} |") in card
    assert m["n_faces"] + m["no_face"] + m["unreadable"] == 12


def test_the_model_card_gives_each_external_age_groups_mean_error(tiny_run, scored):
    _, rows = scored
    pred = np.array([float(r["predicted_age"]) for r in rows])
    true = np.array([float(r["true_age"]) for r in rows])
    card = tiny_run["model_card"].read_text()
    table = card.split(f"### `{NAME}` by age group (true age)")[1].split("\n\n")[0]
    shown = {cells[0]: (int(cells[1]), float(cells[2]), float(cells[3]))
             for line in table.strip().splitlines()[2:] for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    groups = errors_by_group(pred, true)
    assert list(shown) == [g["group"] for g in groups]
    for g in groups:  # the card rounds to 1e-2, predictions.csv to 1e-3
        n, mae, bias = shown[g["group"]]
        assert n == g["n"] and mae == pytest.approx(g["mae_years"], abs=6e-3)
        assert bias == pytest.approx(g["bias_years"], abs=6e-3)
    worst = max(groups, key=lambda g: abs(g["bias_years"]))
    assert f"on `{NAME}`, faces of {worst['group']} are predicted" in card


def test_each_external_prediction_is_what_the_predictor_serves(tiny_run, scored):
    """Same photo through the service path (decode -> detect -> crop_faces -> AgeModel): same age."""
    from faceage.images import load_image
    from faceage.predict import AgePredictor
    from faceage.preprocess import read_faces_manifest

    _, rows = scored
    [cache] = [d for d in tiny_run["external_cache"].iterdir() if d.name.startswith(f"{NAME}-")]
    single = {r["file_name"] for r in read_faces_manifest(cache, "test") if r["n_faces"] == "1"}
    predictor = AgePredictor(tiny_run["model"], tiny_run["detector"])
    checked = 0
    for r in rows:
        if r["file_name"] in single:
            faces = predictor.predict(load_image(tiny_run["external"] / "test" / r["file_name"]))
            assert len(faces) == 1 and faces[0].age == pytest.approx(float(r["predicted_age"]), abs=1e-3)
            checked += 1
    assert checked >= 5
