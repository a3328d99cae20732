"""Round 33: ``python -m faceage.sweep --report-only`` reads the MLflow store and must never create one.

Pointed at a sqlite store that is not there (a mistyped ``MLFLOW_TRACKING_URI``, or the default
``sqlite:///mlflow.db`` in a fresh folder), the report created an empty ``mlflow.db`` (its folder and a lock file
too) as a side effect of reading, then said the runs were not in it. The report needs the runs' params and
metrics, which only the store holds: it now stops with one line naming the path and ``MLFLOW_TRACKING_URI``, and
leaves the folder as it was.
"""

from __future__ import annotations

import json
import logging

import pytest

import faceage.sweep as sweep
from faceage.tracking import mlflow_env

RUN_ID = "a" * 32


def _runs(path, runs=None):
    path.write_text(json.dumps({"resnet18": {"run_id": RUN_ID, "overrides": ["train.backbone=resnet18"]}}
                               if runs is None else runs))
    return path


def _tree(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(autouse=True)
def _keep_caplog(monkeypatch):
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # main's handler setup would hide caplog's


@pytest.mark.parametrize("given", ["absolute", "relative"])
def test_report_only_on_a_store_that_is_not_there_creates_nothing_and_says_so(tmp_path, monkeypatch, caplog, given):
    """`MLFLOW_TRACKING_URI=sqlite:///nowhere/mlflow.db` (a folder that does not exist): nowhere/, nowhere/mlflow.db
    and its lock file were created by the read."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # not a DVC repo: --report-only runs from here, the store's relative path from here too
    runs = _runs(work / "runs.json")
    db = work / "nowhere" / "mlflow.db"
    uri = f"sqlite:///{db}" if given == "absolute" else "sqlite:///nowhere/mlflow.db"
    before = _tree(work)
    with mlflow_env("MLFLOW_TRACKING_URI", uri), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    assert _tree(work) == before, "a read-only command created files"
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"there is no MLflow store at {db} (set MLFLOW_TRACKING_URI to the store" in errors[0]
    assert f"names runs that are not in sqlite:///{db} (resnet18)" in errors[0]
    assert not (work / "reports").exists()


def test_report_only_with_the_default_store_in_a_fresh_folder_creates_no_mlflow_db(tmp_path, monkeypatch, caplog):
    """No MLFLOW_TRACKING_URI: the default `sqlite:///mlflow.db` of the working folder. A fresh clone (or any folder
    without one) got an empty mlflow.db, which a later `mlflow ui` or `git status` then showed."""
    monkeypatch.chdir(tmp_path)
    runs = _runs(tmp_path / "runs.json")
    with mlflow_env("MLFLOW_TRACKING_URI", ""), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    assert _tree(tmp_path) == {"runs.json"}
    [error] = _errors(caplog)
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in error and "MLFLOW_TRACKING_URI" in error


def test_an_empty_file_is_no_store_either(tmp_path, monkeypatch, caplog):
    """A 0-byte mlflow.db (`touch`, or a crashed first access) holds no tables: MLflow's read wrote its schema into
    it, a write a reader must not make."""
    monkeypatch.chdir(tmp_path)
    runs = _runs(tmp_path / "runs.json")
    db = tmp_path / "mlflow.db"
    db.touch()
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    assert db.stat().st_size == 0 and _tree(tmp_path) == {"runs.json", "mlflow.db"}
    [error] = _errors(caplog)
    assert f"no MLflow store at {db}" in error


def test_an_empty_runs_file_against_no_store_names_no_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    runs = _runs(tmp_path / "runs.json", {})
    with mlflow_env("MLFLOW_TRACKING_URI", ""), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    [error] = _errors(caplog)
    assert error.startswith(f"no MLflow store at {tmp_path / 'mlflow.db'}") and "MLFLOW_TRACKING_URI" in error
    assert "names runs" not in error
    assert _tree(tmp_path) == {"runs.json"}


def test_report_only_on_a_real_store_still_writes_the_report(tmp_path, monkeypatch):
    """The check refuses only a store that is not there: a store with the run reports it (read back from MLflow)."""
    from faceage.tracking import setup_mlflow

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"):
        mlflow = setup_mlflow()
        with mlflow.start_run() as run:
            mlflow.log_params({"train.backbone": "resnet18", "train.num_parameters": "11200000",
                               "train.image_size": "64", "train.epochs": "5"})
            mlflow.log_metrics({"best_val_mae": 9.0, "test_mae_years": 9.5, "model_gflops": 0.15, "elapsed_s": 60.0})
        runs = _runs(tmp_path / "runs.json", {"resnet18": {"run_id": run.info.run_id, "overrides": [
            "train.backbone=resnet18", *sweep.PROFILES["cpu"]["cnn"]]}})
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 0
    report = (tmp_path / "reports" / "backbones.md").read_text()
    assert "`resnet18`" in report and "9.50" in report and "from the MLflow runs in `sqlite:///mlflow.db`" in report


def test_collect_on_a_store_that_is_not_there_raises_and_creates_nothing(tmp_path):
    db = tmp_path / "team" / "mlflow.db"
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"):
        with pytest.raises(sweep.SweepError, match=f"no MLflow store at {db}.*MLFLOW_TRACKING_URI"):
            sweep.collect({"resnet18": {"run_id": RUN_ID, "overrides": []}})
    assert list(tmp_path.iterdir()) == []


def test_a_partial_sweep_keeping_runs_of_a_store_that_is_not_there_says_so_before_any_run(tmp_path, monkeypatch,
                                                                                            caplog):
    """A partial sweep checks the runs it keeps (which the report reads) before its first run: against a mistyped
    MLFLOW_TRACKING_URI the line names the missing store, not only the runs."""
    def run_profile(overrides):
        raise AssertionError(f"dvc exp run started: {overrides}")

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.chdir(tmp_path)
    runs = _runs(tmp_path / "runs.json", {"resnet34": {"run_id": RUN_ID, "overrides": [
        "train.backbone=resnet34", *sweep.PROFILES["cpu"]["cnn"]]}})
    db = tmp_path / "typo" / "mlflow.db"
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--profile", "cpu", "--backbones", "resnet18", "--runs", str(runs)]) == 1
    [error] = _errors(caplog)
    assert "(resnet34)" in error and f"there is no MLflow store at {db}" in error and "--backbones" in error
    assert _tree(tmp_path) == {"runs.json"}


def test_a_store_that_is_there_but_refuses_run_reads_still_raises(tmp_path, monkeypatch):
    """Only a store that is not there answers "none of these runs" without being asked: a store that is there and
    refuses reads (a proxy's 403) is still raised, not taken for runs recorded elsewhere (test_sweep_r25.py)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from faceage.tracking import setup_mlflow

    def refused(self, run_id):
        raise MlflowException("403 Forbidden", error_code="PERMISSION_DENIED")

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()
        monkeypatch.setattr(mlflow.MlflowClient, "get_run", refused)
        with pytest.raises(MlflowException, match="403"):
            sweep.unknown_runs({"resnet18": {"run_id": RUN_ID}})
