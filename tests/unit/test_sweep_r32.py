"""Round 32's second read of the sweep, tracking, external sets and the model card: a read-only report on a store
without the ``face-age`` experiment, the head a ``dlib_age`` run recorded, one rule for "no face scored", and no
absolute path of the packager's machine in the card the bento serves."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest

import faceage.sweep as sweep
from faceage.tracking import EXPERIMENT, mlflow_env, setup_mlflow


def _make_store(db) -> None:
    """A sqlite MLflow store with its tables and the Default experiment only, made in another process (so that no
    engine of this process holds a connection to it)."""
    subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                    f"sqlite:///{db}"], check=True, capture_output=True)


@pytest.fixture
def read_only_sqlite(monkeypatch):
    """Every sqlite connection opened from now on refuses writes (``PRAGMA query_only``: SQLite's "attempt to write a
    readonly database", what a store this user may not write gives; tests run as root, where chmod stops nothing)."""
    import sqlite3
    import sqlite3.dbapi2

    connect = sqlite3.dbapi2.connect

    def read_only(*args, **kwargs):
        con = connect(*args, **kwargs)
        con.execute("PRAGMA query_only = ON")
        return con

    monkeypatch.setattr(sqlite3, "connect", read_only)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", read_only)  # SQLAlchemy's pysqlite DBAPI


def test_the_read_only_fixture_really_refuses_writes(tmp_path, read_only_sqlite):
    import sqlite3

    with pytest.raises(sqlite3.OperationalError, match="readonly database"):
        sqlite3.connect(tmp_path / "x.db").execute("CREATE TABLE t (x)")


def test_report_only_on_a_read_only_store_without_the_experiment_is_one_line(tmp_path, monkeypatch, caplog,
                                                                             read_only_sqlite):
    """`--report-only` on a team's read-only store that holds no face-age experiment: setup_mlflow(writable=False)
    still created the experiment, and SQLite's "attempt to write a readonly database" ended in a traceback."""
    db = tmp_path / "mlflow.db"
    _make_store(db)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"resnet18": {"run_id": "a" * 32, "overrides": ["train.backbone=resnet18"]}}))
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "holds no face-age runs" in errors[0] and f"sqlite:///{db}" in errors[0] and "(resnet18)" in errors[0]
    import mlflow

    assert mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name(EXPERIMENT) is None  # nothing written


def test_a_read_only_reader_does_not_create_the_experiment(tmp_path):
    """setup_mlflow(writable=False) on a store without the experiment: a TrackingError naming the store, and the
    store left as it was (it created the experiment, a write a reader must not make)."""
    import mlflow

    from faceage.tracking import NoExperimentError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        with pytest.raises(NoExperimentError, match="holds no face-age runs"):
            setup_mlflow(writable=False)
    assert mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT) is None
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        setup_mlflow()  # a writer still creates it
    assert mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT) is not None


def _log_dlib_age(mlflow, params: dict) -> str:
    base = {"train.backbone": "dlib_age", "train.num_parameters": "5600000", "train.image_size": "64",
            "train.epochs": "30"}
    with mlflow.start_run() as run:
        mlflow.log_params({**base, **params})
        mlflow.log_metrics({"best_val_mae": 5.0, "test_mae_years": 5.5, "model_gflops": 0.5, "elapsed_s": 10.0})
    return run.info.run_id


@pytest.mark.parametrize("params", [
    {"train.head": "auto", "train.head_resolved": "ensemble"},  # no train.face_features: the checkpoint was read
    # auto read with today's rule (fused), where the run recorded what its training chose
    {"train.head": "auto", "train.face_features": "descriptor", "train.head_resolved": "ensemble"},
])
def test_the_head_a_run_recorded_is_read_from_its_params_without_its_checkpoint(tmp_path, monkeypatch, params):
    """Training logs `train.head_resolved` (what `train.head: auto` chose); the report downloaded the checkpoint
    (tens of MB per run) or re-derived `auto` with today's rule instead of reading it."""
    import mlflow

    downloads = []

    def download(self, run_id, path, dst=None):  # _run_head takes any error for a missing checkpoint: recorded
        downloads.append(path)
        raise OSError("no checkpoint in this test")

    monkeypatch.setattr(mlflow.MlflowClient, "download_artifacts", download)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        runs = {"dlib_age": {"run_id": _log_dlib_age(setup_mlflow(), params), "overrides": []}}
        (row,) = sweep.collect(runs)
    assert row["head"] == "ensemble"
    assert downloads == []


def test_a_run_with_an_unknown_recorded_head_falls_back_to_the_older_reading(tmp_path):
    """A `train.head_resolved` that is no head this code knows is not taken as one."""
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow = setup_mlflow()
        run_id = _log_dlib_age(mlflow, {"train.head": "ensemble", "train.head_resolved": "mystery"})
        (row,) = sweep.collect({"dlib_age": {"run_id": run_id, "overrides": []}})
    assert row["head"] == "ensemble"


@pytest.mark.parametrize("n_faces, scored", [(0, False), (0.0, False), (math.nan, False), (None, False),
                                             ("x", False), (1, True), (1726, True), (3.0, True)])
def test_one_rule_decides_whether_a_set_had_a_face_scored(n_faces, scored):
    """Three copies of the rule (evaluate's MLflow metrics, the card, the champion guard's MAEs) disagreed on NaN."""
    from faceage.evaluation import external_mlflow_metrics
    from faceage.external import external_maes, some_faces
    from faceage.model_card import _scored

    assert some_faces(n_faces) is scored
    m = {"mae_years": 7.0, "rmse_years": 9.0, "cs5": 0.5, "baseline_mae_years": 25.0, "mae_by_age_group": {},
         "n_faces": n_faces, "n_images": 5, "no_face": 0, "unreadable": 0}
    assert ("external_s_mae" in external_mlflow_metrics({"s": m}, 5.0)) is scored
    assert (_scored(m, "mae_years") != "-") is scored
    assert ("s" in external_maes({"external_s_n_faces": n_faces, "external_s_mae": 7.0})) is scored
    assert _scored({"mae_years": 7.0}, "mae_years") == "7.00"  # a set without a count: shown, as before


GROUP = {"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 0.5}
METRICS = {"mae_years": 4.0, "rmse_years": 5.0, "cs5": 0.6, "baseline_mae_years": 9.0, "n_test_faces": 3,
           "temperature": 1.0, "mean_predicted_std": 3.0, "coverage_1std": 0.7, "coverage_2std": 0.95}
META = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "val_mae": 4.0,
        "mlflow_run_id": "r" * 32,
        "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64, "detector_sha256": "f" * 64},
        "train_params": {"epochs": 3}}


def _card(tmp_path, tracking_uri, source="https://example.org/appa-real-release.zip") -> str:
    from faceage.model_card import write_model_card

    dataset = {"source": source, "sha256": "d" * 64, "counts": {"train": 3}}
    return write_model_card(tmp_path / "card.md", METRICS, {"age_group": [GROUP]}, META, dataset, None,
                            tracking_uri).read_text()


def _line(card: str, start: str) -> str:
    return next(line for line in card.splitlines() if line.startswith(start))


def test_the_card_shows_no_absolute_path_of_the_machine_that_wrote_it(tmp_path, monkeypatch):
    """The card ships in the bento (GET /model_card): its Lineage said `in sqlite:////home/alice/faceage/mlflow.db`,
    and a local fetch_data.source its absolute path, folders of the packager's machine."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    monkeypatch.chdir(repo)  # faceage.paths.repo_root
    run = f"- MLflow run `{'r' * 32}`"
    assert _line(_card(tmp_path, f"sqlite:///{repo / 'mlflow.db'}"), run) == f"{run} in `sqlite:///mlflow.db`"
    assert _line(_card(tmp_path, f"sqlite:///{repo / 'stores' / 'team.db'}?timeout=30"), run) == \
        f"{run} in `sqlite:///stores/team.db?timeout=30`"
    outside = _line(_card(tmp_path, f"sqlite:///{tmp_path / 'elsewhere' / 'team.db'}"), run)
    assert outside == f"{run} in `team.db`" and str(tmp_path) not in outside
    # A server stays, its password masked (evaluate passes display_uri()); no store: no "in"
    assert _line(_card(tmp_path, "http://alice:***@mlflow.example.com:5000"), run) == \
        f"{run} in `http://alice:***@mlflow.example.com:5000`"
    assert _line(_card(tmp_path, None), run) == run
    # The data source: a local path alike, a URL as before (masked)
    source = "- Source: "
    assert _line(_card(tmp_path, None, str(repo / "data" / "appa-real-sample")), source).startswith(
        "- Source: `data/appa-real-sample`;")
    assert _line(_card(tmp_path, None, str(tmp_path / "dl" / "appa-real-release.zip")), source).startswith(
        "- Source: `appa-real-release.zip`;")
    assert _line(_card(tmp_path, None, "https://u:pw@example.org/a.zip?X-Amz-Signature=s"), source).startswith(
        "- Source: `https://u:***@example.org/a.zip?X-Amz-Signature=***`;")


def test_the_sweep_report_names_the_store_without_the_machines_folders(tmp_path, monkeypatch):
    """reports/backbones.md (committed) said `from the MLflow runs in sqlite:////work/main/mlflow.db`, and listed the
    runs' data source as tagged, a presigned URL's signature included."""
    monkeypatch.chdir(tmp_path)
    row = {"backbone": "resnet18", "run_id": "0123456789", "overrides": [], "params_m": 11.2, "gflops": 1.8,
           "image_size": 224, "epochs": 30, "train_time_s": 100.0, "val_mae": 5.0, "test_mae": 5.5, "cs5": 0.6,
           "coverage_1std": 0.7, "baseline_mae": 12.0, "external": {}, "device": "cuda",
           "data_source": "https://u:pw@example.org/a.zip?X-Amz-Signature=s"}
    md = tmp_path / "backbones.md"
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        sweep.write_report([row], md, tmp_path / "backbones.png", "gpu")
    text = md.read_text()
    assert "from the MLflow runs in `sqlite:///mlflow.db`" in text and str(tmp_path) not in text
    # The runs' source, which the report listed as tagged: a presigned URL's signature and a password masked
    assert "data (`fetch_data.source`): `https://u:***@example.org/a.zip?X-Amz-Signature=***`" in text
    assert "pw@" not in text and "Signature=s" not in text


def test_the_bento_lineage_shows_no_folders_of_the_packagers_machine(tmp_path):
    """faceage.json ships in the bento, and every /predict answer's "model" carries it: a local fetch_data.source
    was there as the packager's absolute path (its folders, its user name), as the model card no longer shows it."""
    import types

    from faceage.packaging import Winner, model_metadata
    from faceage.paths import repo_root

    winner = Winner("r", "n", 4.0, 4.1, 0, "d" * 64, "c0")
    crop = {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64, "detector_sha256": "f" * 64}
    version = types.SimpleNamespace(name="face-age", version=1)
    outside = model_metadata(winner, {"backbone": "resnet18", "crop": {**crop, "data_source": "/home/alice/faces/sample"}},
                             version)
    assert outside["data_source"] == "sample"
    inside = model_metadata(winner, {"backbone": "resnet18",
                                     "crop": {**crop, "data_source": str(repo_root() / "data" / "mine.zip")}}, version)
    assert inside["data_source"] == "data/mine.zip"
    assert model_metadata(winner, {"backbone": "resnet18", "crop": crop}, version)["data_source"] is None
