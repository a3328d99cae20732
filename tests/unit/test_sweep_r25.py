"""`python -m faceage.sweep --report-only` where the recorded runs are not in this store."""

import json
import logging

import faceage.sweep as sweep
from faceage.tracking import mlflow_env, setup_mlflow


def test_report_only_on_runs_of_another_store_is_one_error_line(tmp_path, caplog, monkeypatch):
    """A fresh clone's `--report-only` failed with MlflowException "Run with id=... not found" (a traceback): the
    committed reports/sweep_runs.json names the runs of the machine that swept."""
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"resnet18": {"run_id": "df3fb03e" * 4, "overrides": ["train.backbone=resnet18"]}}))
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"), \
            caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    assert "names runs that are not in sqlite:///" in caplog.text and "(resnet18)" in caplog.text


def test_a_store_that_refuses_run_reads_is_not_taken_for_runs_recorded_elsewhere(tmp_path, monkeypatch):
    """Every MlflowException from get_run counted as "not in this store", so a proxy refusing run reads (403) was
    answered "run the sweep here", hours of training that could not help."""
    import mlflow
    import pytest
    from mlflow.exceptions import MlflowException

    def refused(self, run_id):
        raise MlflowException("403 Forbidden", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(mlflow.MlflowClient, "get_run", refused)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()  # a store that is there (one that is not is never asked: test_sweep_r33)
        with pytest.raises(MlflowException, match="403"):
            sweep.unknown_runs({"resnet18": {"run_id": "a" * 32}})
