"""Round 34: comparing runs apples to apples, in the champion rule (`make bento`) and the sweep report.

- Two runs each scored on both external sets, each better than the other on one of them by more than the
  guard's margin: no run can win (the rule), but packaging said "evaluate the runs on the same evaluate.external
  sets", which they were; the message now says what happened and the two ways out.
- The sweep report ranked backbones whose runs trained on different data (a partial re-sweep after the data
  changed: another committed ``fetch_data.source``, a ``--source`` folder whose files changed): test MAEs on
  different test splits, one verdict. It now refuses, as for different ``--source`` overrides.
- The sweep report put external MAEs measured on different versions of a set (its files changed between two
  backbones' evaluations) in one column, unmarked; they are now marked against the newest run's version, and a
  note names the backbones to sweep again.
- The sweep report said `mlflow ui --backend-store-uri sqlite:///mlflow.db` whatever the store: with a tracking
  server (or another sqlite file) that store holds none of the report's runs.

Every store is a real SQLite MLflow store in ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

import faceage.sweep as sweep
import tests.unit.test_packaging as packaging_tests
from faceage.external import EXTERNAL_SHA256_TAG
from faceage.packaging import PackagingError, rank_candidates, select_winner
from faceage.tracking import EXPERIMENT, mlflow_env

store, client = packaging_tests.store, packaging_tests.client


def add_run(client, name, metrics, ext, data="d" * 64):
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=name, tags={
        "data_sha256": data, "evaluate.external": json.dumps([f"/sets/{n}" for n in ext]),
        EXTERNAL_SHA256_TAG: json.dumps({n: "v1" for n in ext})})
    for key, value in {**metrics, **{f"external_{n}_mae": v for n, v in ext.items()},
                       **{f"external_{n}_n_faces": 500 for n in ext}}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.01)
    return run.info.run_id


def test_runs_that_each_trail_the_other_on_one_set_are_said_so_not_sent_to_evaluate_again(client):
    add_run(client, "x", {"best_val_mae": 4.0, "test_mae_years": 4.0}, {"a": 6.0, "b": 9.0})
    add_run(client, "y", {"best_val_mae": 4.5, "test_mae_years": 4.5}, {"a": 7.0, "b": 7.0})
    with pytest.raises(PackagingError) as err:
        select_winner(client, external_sha256={"a": "v1", "b": "v1"})
    message = str(err.value)
    assert "evaluate the runs on the same evaluate.external sets" not in message
    assert "every run was scored on every set" in message
    assert "x: b MAE 9.000 > best 7.000 + 0.500" in message and "y: a MAE 7.000 > best 6.000 + 0.500" in message
    assert "drop a set from evaluate.external" in message


def test_runs_not_scored_on_a_set_still_get_the_advice_to_evaluate_them(client):
    add_run(client, "old", {"best_val_mae": 4.0, "test_mae_years": 4.0}, {"a": 5.0})
    add_run(client, "new", {"best_val_mae": 3.0, "test_mae_years": 3.0}, {"a": 6.0, "b": 7.0})
    with pytest.raises(PackagingError, match="evaluate the runs on the same evaluate.external sets"):
        select_winner(client, external_sha256={"a": "v1", "b": "v1"})


def test_a_guard_veto_alone_is_told_apart_from_the_other_exclusions():
    from faceage.packaging import Candidate

    ranked = rank_candidates([Candidate("x", "x", 4.0, 4.0, 1, {"a": 6.0, "b": 9.0}, ""),
                              Candidate("y", "y", 4.5, 4.5, 2, {"a": 7.0}, ""),
                              Candidate("z", "z", 5.0, 5.0, 3, {"a": 6.2, "b": 7.0}, "")])
    by_id = {c.run_id: c for c in ranked}
    assert by_id["x"].vetoed and by_id["x"].excluded == "b MAE 9.000 > best 7.000 + 0.500"
    assert not by_id["y"].vetoed and by_id["y"].excluded == "not scored on b; a MAE 7.000 > best 6.000 + 0.500"
    assert not by_id["z"].vetoed and not by_id["z"].excluded and ranked[0].run_id == "z"


# --- the sweep report -------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _keep_caplog(monkeypatch):
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # main's handler setup would hide caplog's


def _sweep_run(mlflow, backbone, test_mae, data="d" * 64, external=None):
    with mlflow.start_run() as run:
        mlflow.log_params({"train.backbone": backbone, "train.num_parameters": "11200000", "train.image_size": "64",
                           "train.epochs": "5"})
        mlflow.log_metrics({"best_val_mae": test_mae - 0.5, "test_mae_years": test_mae, "model_gflops": 0.15,
                            "elapsed_s": 60.0})
        tags = {"data_sha256": data}
        if external:
            tags["evaluate.external"] = json.dumps([f"/sets/{n}" for n in external])
            tags[EXTERNAL_SHA256_TAG] = json.dumps({n: v for n, (_, v) in external.items()})
            mlflow.log_metrics({**{f"external_{n}_mae": m for n, (m, _) in external.items()},
                                **{f"external_{n}_n_faces": 500 for n in external}})
        mlflow.set_tags(tags)
    return {"run_id": run.info.run_id, "overrides": [f"train.backbone={backbone}", *sweep.PROFILES["cpu"]["cnn"]]}


def _report(tmp_path, monkeypatch, runs_of, caplog):
    from faceage.tracking import setup_mlflow

    monkeypatch.chdir(tmp_path)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        runs = runs_of(setup_mlflow())
        (tmp_path / "runs.json").write_text(json.dumps(runs))
        with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
            code = sweep.main(["--report-only", "--runs", str(tmp_path / "runs.json")])
    report = tmp_path / "reports" / "backbones.md"
    return code, report.read_text() if report.exists() else None


def test_the_report_refuses_runs_trained_on_different_data(tmp_path, monkeypatch, caplog):
    code, report = _report(tmp_path, monkeypatch, lambda mlflow: {
        "resnet18": _sweep_run(mlflow, "resnet18", 9.5, data="a" * 64),
        "resnet34": _sweep_run(mlflow, "resnet34", 8.0, data="b" * 64),
        "resnet50": _sweep_run(mlflow, "resnet50", 8.5, data="b" * 64)}, caplog)
    assert (code, report) == (1, None)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "trained on different data" in errors[0]
    assert "resnet18: data sha256 aaaaaaaaaaaa" in errors[0] and "resnet34: data sha256 bbbbbbbbbbbb" in errors[0]


def test_the_report_of_runs_on_the_same_data_is_written(tmp_path, monkeypatch, caplog):
    code, report = _report(tmp_path, monkeypatch, lambda mlflow: {
        "resnet18": _sweep_run(mlflow, "resnet18", 9.5), "resnet34": _sweep_run(mlflow, "resnet34", 8.0)}, caplog)
    assert code == 0 and "`resnet34`" in report


def test_external_maes_on_another_version_of_a_set_are_marked(tmp_path, monkeypatch, caplog):
    code, report = _report(tmp_path, monkeypatch, lambda mlflow: {
        "resnet18": _sweep_run(mlflow, "resnet18", 9.5, external={"utk": (11.0, "1111aaaa" * 8)}),
        "resnet34": _sweep_run(mlflow, "resnet34", 8.0, external={"utk": (10.0, "1111aaaa" * 8)}),
        "resnet50": _sweep_run(mlflow, "resnet50", 8.5, external={"utk": (7.0, "2222bbbb" * 8)})}, caplog)
    assert code == 0
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| `")}
    # The newest run (resnet50) was scored on the set's files as they are: the two before it are the stale ones.
    assert "| 7.00 |" in rows["`resnet50`"]
    assert "| 11.00* |" in rows["`resnet18`"] and "| 10.00* |" in rows["`resnet34`"]
    assert ("`utk` MAE marked * was measured on another version of the set's files (1111aaaa, the newest run's "
            "2222bbbb): not comparable with the column's other values; sweep `resnet18`, `resnet34` again "
            "(`--backbones resnet18 resnet34`)") in report


def test_external_maes_on_one_version_are_not_marked(tmp_path, monkeypatch, caplog):
    code, report = _report(tmp_path, monkeypatch, lambda mlflow: {
        "resnet18": _sweep_run(mlflow, "resnet18", 9.5, external={"utk": (11.0, "1111aaaa" * 8)}),
        "resnet34": _sweep_run(mlflow, "resnet34", 8.0, external={"utk": (10.0, "1111aaaa" * 8)})}, caplog)
    assert code == 0 and "*" not in report.split("## ")[0].split("![")[1] and "another version" not in report


ROW = {"backbone": "resnet18", "run_id": "r" * 32, "overrides": [], "params_m": 11.2, "gflops": 0.15,
       "image_size": 64, "epochs": 5, "train_time_s": 60.0, "val_mae": 9.0, "test_mae": 9.5, "cs5": 0.3,
       "coverage_1std": 0.6, "baseline_mae": 12.0, "external": {}, "data_source": "s", "device": "cpu", "threads": "2"}


@pytest.mark.parametrize("uri, browse", [
    ("http://mlflow-host:5000", "open http://mlflow-host:5000 in a browser"),
    ("https://user:secret@mlflow-host", "open https://user:***@mlflow-host in a browser"),
    ("sqlite:///mlflow.db", "`mlflow ui --backend-store-uri sqlite:///mlflow.db`"),
    ("sqlite:///stores/sweep.db", "`mlflow ui --backend-store-uri sqlite:///stores/sweep.db`"),
    ("sqlite:////elsewhere/team/sweep.db", "`mlflow ui --backend-store-uri sqlite:///<path to sweep.db>`"),
])
def test_the_report_says_how_to_browse_the_store_its_runs_are_in(tmp_path, monkeypatch, uri, browse):
    """With a tracking server (or another sqlite file) the report still said `mlflow ui --backend-store-uri
    sqlite:///mlflow.db`: a store without these runs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sweep.write_report([ROW], tmp_path / "backbones.md", tmp_path / "backbones.png", "cpu")
    head = (tmp_path / "backbones.md").read_text().split("\n\n")[1]
    assert browse in head
    assert "secret" not in head
    if not uri.startswith("sqlite:///mlflow.db"):
        assert "sqlite:///mlflow.db" not in head
