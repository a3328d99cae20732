"""Round-35 review of evaluation and reporting: re-evaluations in MLflow, a tracking URL that is not an MLflow server."""

from __future__ import annotations

import http.server

import pytest

from faceage.tracking import EXPERIMENT, TrackingError, check_run, mlflow_env, setup_mlflow, write_run_file
from tests.conftest import http_server


@pytest.fixture
def finished_run(tmp_path):
    """A finished run in a real sqlite store in ``tmp_path`` (train's run, as evaluate continues it)."""
    import mlflow

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        client = mlflow.MlflowClient()
        run = client.create_run(client.create_experiment(EXPERIMENT, (tmp_path / "mlruns").as_uri()))
        client.log_metric(run.info.run_id, "val_mae", 6.0, step=1)
        client.set_terminated(run.info.run_id, "FINISHED")
        yield client, run.info.run_id


def test_a_reevaluation_updates_the_metrics_instead_of_adding_copies(finished_run, tmp_path):
    """Each evaluation logged every metric again at step 0: `dvc repro -f`, or an evaluate-only `dvc exp run` with
    the same settings, gave each of the ~40 test_/external_ metrics a second, identical point in its MLflow history
    (a line chart of repeated values where there was one number). The latest value is what changes."""
    from faceage.evaluation import log_evaluation

    client, run_id = finished_run
    card = tmp_path / "model_card.md"
    card.write_text("# card\n")
    metrics = {"test_mae_years": 4.5, "test_cs5": 0.66, "external_utk_mae": 7.0}
    for _ in range(3):
        log_evaluation(run_id, metrics, {"evaluate.cs_years": 5}, [card])
    for key, value in metrics.items():
        assert [m.value for m in client.get_metric_history(run_id, key)] == [value], key
    log_evaluation(run_id, {**metrics, "test_mae_years": 4.25}, {"evaluate.cs_years": 5}, [card])  # a new value
    assert [m.value for m in client.get_metric_history(run_id, "test_mae_years")] == [4.5, 4.25]
    assert [m.value for m in client.get_metric_history(run_id, "test_cs5")] == [0.66]
    run = client.get_run(run_id)
    assert run.data.metrics == {"test_mae_years": 4.25, "test_cs5": 0.66, "external_utk_mae": 7.0, "val_mae": 6.0}
    assert run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id, "evaluation")] == ["evaluation/model_card.md"]


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """Something else on the tracking URL's port: macOS's AirPlay receiver answers 403 on port 5000 (MLflow's
    default), a BentoML service or a mistyped path 404."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [404, 403])
def test_a_tracking_url_that_is_not_an_mlflow_server_is_one_clear_error(status, tmp_path):
    """The probe counts any HTTP answer as a server; MLflow's first request then failed with "API request to endpoint
    /api/2.0/mlflow/experiments/get-by-name failed with error code 404 != 200" in a traceback (evaluate's
    check_run, train's start), where the user needs to hear the URL reaches no MLflow tracking server."""
    with http_server(_NotMlflow, status=status) as srv:
        uri = f"http://alice:s3cret@127.0.0.1:{srv.server_port}"
        with mlflow_env("MLFLOW_TRACKING_URI", uri):
            with pytest.raises(TrackingError) as e:
                setup_mlflow()
            run_file = tmp_path / "run.json"
            write_run_file(run_file, "0123", "1")
            with pytest.raises(TrackingError):
                check_run(run_file)
    message = str(e.value)
    assert f"http://alice:***@127.0.0.1:{srv.server_port}" in message and "s3cret" not in message
    assert "MLFLOW_TRACKING_URI" in message and f"answers {status}" in message
    assert "not an MLflow tracking server" in message and "\n" not in message


class _WideModel:
    """A checkpoint's metadata and a model predicting 40 +- 10 for every face."""

    def __init__(self, crop: dict):
        self.meta = {"crop": crop, "backbone": "resnet18", "image_size": 64}

    def predict_inputs(self, images, batch_size):
        import numpy as np

        return np.full(len(images), 40.0), np.full(len(images), 10.0)


def test_an_external_sets_calibration_is_measured_and_logged(detector_dir, tmp_path):
    """The card's calibration (true age within 1 and 2 predicted std) was the test split's alone: the std a user
    gets on their own photos, closer to another collection's, was never measured on the external sets."""
    import math

    from skimage.data import astronaut

    from faceage.config import EvaluateParams
    from faceage.evaluation import evaluate_external, external_mlflow_metrics
    from faceage.sources import resolve_external
    from tests.unit.test_external import checkpoint_crop, make_set, noise

    blank = make_set(tmp_path / "blank", {"n.jpg": noise()})
    faces = make_set(tmp_path / "faces", {"astronaut.jpg": astronaut()}, {"astronaut.jpg": 53.0})
    sets = resolve_external([str(blank), str(faces)], tmp_path)
    p = EvaluateParams(external=tuple(str(s.path) for s in sets), low_res=())
    results, _, _ = evaluate_external(_WideModel(checkpoint_crop(detector_dir)), sets, p, detector_dir, 30.0,
                                      tmp_path / "cache")
    # |40 - 53| = 13: outside 1 std (10), inside 2 std (20)
    assert (results["faces"]["coverage_1std"], results["faces"]["coverage_2std"]) == (0.0, 1.0)
    assert results["faces"]["mean_predicted_std"] == 10.0
    assert all(math.isnan(results["blank"][k]) for k in ("coverage_1std", "coverage_2std", "mean_predicted_std"))
    flat = external_mlflow_metrics(results, p.cs_years)
    assert (flat["external_faces_coverage_1std"], flat["external_faces_coverage_2std"]) == (0.0, 1.0)
    assert flat["external_faces_mean_predicted_std"] == 10.0
    assert not any("coverage" in k or "std" in k for k in flat if k.startswith("external_blank_"))


def _card_with(tmp_path, external: dict) -> str:
    from faceage.model_card import write_model_card

    meta = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "input": "image",
            "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 224, "no_face": "release_crop",
                     "detector_sha256": "f" * 64},
            "train_params": {"epochs": 3, "pretrained": "imagenet"}, "best_epoch": 3, "val_mae": 5.7,
            "temperature": 1.1}
    groups = [{"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 1.0}]
    metrics = {"mae_years": 5.85, "mae_real_years": 5.85, "rmse_years": 7.0, "cs5": 0.5, "baseline_mae_years": 20.0,
               "n_test_faces": 3, "coverage_1std": 0.7, "coverage_2std": 0.95, "mean_predicted_std": 5.0,
               "temperature": 1.1, "external": external}
    return write_model_card(tmp_path / "card.md", metrics, {"age_group": groups}, meta, {"counts": {"train": 9}},
                            None, None).read_text()


def _external(n_faces: int, **calibration) -> dict:
    nan = float("nan")
    scored = n_faces > 0
    return {"mae_years": 7.0 if scored else nan, "rmse_years": 9.0 if scored else nan, "cs5": 0.4 if scored else nan,
            "baseline_mae_years": 25.0 if scored else nan, "n_images": 4, "n_faces": n_faces, "no_face": 4 - n_faces,
            "unreadable": 0, "mae_by_age_group": {}, "mae_low_res": {}, **calibration}


def test_the_cards_calibration_names_its_data_and_shows_the_external_sets_beside_it(tmp_path):
    """The card's "True age within 1 std: 0.700 ... mean predicted std 5.00 years" named no data (it was the test
    split's), and the external sets had no calibration numbers beside it."""
    card = _card_with(tmp_path, {
        "utk": _external(4, coverage_1std=0.25, coverage_2std=0.5, mean_predicted_std=6.0),
        "blank": _external(0, coverage_1std=float("nan"), coverage_2std=float("nan"),
                           mean_predicted_std=float("nan")),
        "old": _external(4),  # evaluated before the sets' calibration was measured: no numbers
    })
    calibration = card.split("## Calibration")[1].split("\n## ")[0]
    assert "| | test split | `utk` | `blank` | `old` |" in calibration
    assert "| true age within 1 std (a Gaussian: 0.683) | 0.700 | 0.250 | - | - |" in calibration
    assert "| true age within 2 std (a Gaussian: 0.954) | 0.950 | 0.500 | - | - |" in calibration
    assert "| mean predicted std (years) | 5.00 | 6.00 | - | - |" in calibration
    assert "nan" not in calibration.lower()
    alone = _card_with(tmp_path, {}).split("## Calibration")[1].split("\n## ")[0]
    assert "On the test split: true age within 1 std: 0.700" in alone and "mean predicted std 5.00 years" in alone


def test_every_plot_axis_says_what_it_shows_and_in_which_unit(tmp_path, monkeypatch):
    """The error-by-age-group plot's x axis read "true age group", without its unit, beside "MAE (years)"."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    from faceage.evaluation import _plots, errors_by_group

    labels, savefig = {}, Figure.savefig

    def recording(fig, path, *args, **kwargs):
        labels[path.name] = (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel())
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    (tmp_path / "history.csv").write_text("epoch,train_loss,train_mae,val_mae,lr\n1,2.0,9.0,8.0,0.001\n")
    true, pred = np.array([5.0, 25.0, 71.0]), np.array([7.0, 22.0, 60.0])
    _plots(tmp_path, pred, true, errors_by_group(pred, true), tmp_path / "history.csv")
    assert labels == {"pred_vs_true.png": ("true age (years)", "predicted age (years)"),
                      "error_by_age_group.png": ("true age group (years)", "MAE (years)"),
                      "training_curves.png": ("epoch", "MAE (years)")}
