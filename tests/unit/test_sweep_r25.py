"""`python -m faceage.sweep --report-only` where the recorded runs are not in this store."""

import json
import logging

import faceage.sweep as sweep
from faceage.tracking import mlflow_env


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
