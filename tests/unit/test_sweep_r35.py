"""Round 35 review of the sweep report (``faceage.sweep``), read as an ML engineer reads it.

- A run with a NaN test MAE (a model that output NaN on some test faces: packaging's champion rule refuses such runs)
  left the whole table unsorted (every comparison with NaN is False) and set the conclusion's numbers: the rank
  correlation said +1.00 where the other runs gave -0.50.
- Two CNNs with the same test MAE got a rank correlation from the last of their tied ranks (-0.25 where Spearman's,
  from average ranks, is -0.87), which flipped the verdict.
- A runs file naming a run this store does not hold (after the sweep: a train stage DVC restored from its run cache,
  logged to another store) or a run that never logged its test MAE (a run still going, or one that failed) ended the
  sweep, after its last run, with MLflow's or a KeyError's traceback.

Every store is a real SQLite MLflow store in ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import math

import pytest

import faceage.sweep as sweep
from faceage.tracking import mlflow_env
from tests.unit.test_champion_r34b import client, store
from tests.unit.test_sweep_r34 import add_backbone_run, report

FIXTURES = (client, store, report)  # shared fixtures, used by name


def set_gflops(client, entry: dict, gflops: float) -> None:
    client.log_metric(entry["run_id"], "model_gflops", gflops, step=1)  # the latest step is the one read back


def test_a_run_with_a_nan_test_mae_is_ranked_last_and_left_out_of_the_verdict(client, tmp_path, report):
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.0, None),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", math.nan, None),
            "resnet50": add_backbone_run(client, tmp_path, "resnet50", 7.0, None),
            "mobilenet_v3_large": add_backbone_run(client, tmp_path, "mobilenet_v3_large", 8.0, None)}
    for backbone, gflops in {"resnet18": 0.3, "resnet34": 0.6, "resnet50": 0.7, "mobilenet_v3_large": 0.04}.items():
        set_gflops(client, runs[backbone], gflops)
    text, table = report(runs)
    assert list(table) == ["resnet50", "mobilenet_v3_large", "resnet18", "resnet34"]
    assert "| nan |" in table["resnet34"]
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in lines}) == 1, lines  # header, separator and rows: the same columns
    # Spearman of GFLOPs (0.04, 0.3, 0.7) with test MAE (8, 9, 7) over the runs that have one
    assert "Rank correlation of FLOPs with test MAE: -0.50" in text
    assert "test MAE 7.00-9.00 years" in text
    assert "`resnet18` 9.00 -> `resnet50` 7.00" in text  # the family line without the NaN run
    assert "`resnet34` has no test MAE (nan)" in text


def test_equal_test_maes_get_average_ranks_in_the_rank_correlation():
    def row(backbone, gflops, test_mae):
        return {"backbone": backbone, "gflops": gflops, "test_mae": test_mae, "epochs": 5, "baseline_mae": 20.0}

    text = sweep._conclusion([row("resnet18", 0.3, 6.0), row("resnet34", 0.6, 5.0), row("resnet50", 0.7, 5.0)])
    assert "Rank correlation of FLOPs with test MAE: -0.87" in text
    assert "**bigger backbones reduce the error**" in text
    flat = sweep._conclusion([row("resnet18", 0.3, 5.0), row("resnet34", 0.6, 5.0), row("resnet50", 0.7, 5.0)])
    assert "Rank correlation of FLOPs with test MAE: +0.00" in flat
    assert sweep._spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 1.0, 2.0]) == pytest.approx(1 - 6 * 18 / (4 * 15))  # no ties: the classic formula


def test_a_run_the_store_does_not_hold_is_one_error_naming_its_backbone(client, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.0, None),
            "resnet50": {"run_id": "0123456789abcdef0123456789abcdef", "overrides": []}}
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{store[1] / 'mlflow.db'}"):
        with pytest.raises(sweep.SweepError) as err:
            sweep.collect(runs)
    message = str(err.value)
    assert "`resnet50`" in message and "01234567" in message and "is not in the tracking store" in message
    assert "MLFLOW_TRACKING_URI" in message and "run cache" in message


def test_a_run_without_a_test_mae_is_one_line_and_no_report(client, store, tmp_path, monkeypatch, caplog):
    """A run that is still going (or failed) before evaluate logged its test MAE: ``--report-only`` says which."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # main's handler setup would hide caplog's
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.0, None)}
    exp = client.get_experiment_by_name("face-age")
    going = client.create_run(exp.experiment_id, run_name="exp-resnet50")
    for key, value in {"train.backbone": "resnet50", "train.num_parameters": "23500000", "train.image_size": "64",
                       "train.epochs": "5"}.items():
        client.log_param(going.info.run_id, key, value)
    client.log_metric(going.info.run_id, "best_val_mae", 8.0)
    runs["resnet50"] = {"run_id": going.info.run_id, "overrides": runs["resnet18"]["overrides"]}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{store[1] / 'mlflow.db'}"), \
            caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(tmp_path / "runs.json")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "`resnet50`" in errors[0] and "RUNNING" in errors[0] and "test_mae_years" in errors[0]
    assert "--backbones resnet50" in errors[0]
    assert not (tmp_path / "reports" / "backbones.md").exists()
