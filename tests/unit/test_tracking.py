"""``mlflow_env``: an MLflow setting for the duration of a block, the environment restored after;
``setup_mlflow``: runs that start at once on a fresh sqlite store all land in it."""

import multiprocessing
import os

import pytest

from faceage.tracking import EXPERIMENT, mlflow_env

NAME = "FACEAGE_TEST_MLFLOW_SETTING"


def test_an_unset_variable_is_unset_again(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    with mlflow_env(NAME, "cpu"):
        assert os.environ[NAME] == "cpu"
    assert NAME not in os.environ


def test_a_set_variable_gets_its_value_back_also_after_an_error(monkeypatch):
    monkeypatch.setenv(NAME, "cuda")
    with pytest.raises(RuntimeError, match="boom"), mlflow_env(NAME, "cpu"):
        assert os.environ[NAME] == "cpu"
        raise RuntimeError("boom")
    assert os.environ[NAME] == "cuda"


def test_the_tracking_uri_of_the_block_wins_over_a_uri_set_before_and_is_undone_after(tmp_path, monkeypatch):
    """MLflow reads ``mlflow.set_tracking_uri``'s process-wide URI before the variable: a URI left by
    earlier code (here a stopped server's) hid the block's store, and ``setup_mlflow`` inside the
    block left the block's store behind it."""
    import mlflow

    from faceage.tracking import setup_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # (restored after the test, as is the URI: the
    dead = "http://127.0.0.1:9"  # autouse fixture in tests/conftest.py). Nothing listens on port 9.
    mlflow.set_tracking_uri(dead)  # which also writes the variable, for subprocesses
    env = os.environ.get("MLFLOW_TRACKING_URI")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", store):
        assert mlflow.get_tracking_uri() == store
        experiment = mlflow.MlflowClient().create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
        setup_mlflow()
    assert mlflow.get_tracking_uri() == dead and os.environ.get("MLFLOW_TRACKING_URI") == env  # both as they were
    assert mlflow.MlflowClient(store).get_experiment(experiment).name == "x"

    mlflow.set_tracking_uri(None)  # no process-wide URI: MLflow reads the variable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///outside.db")
    assert mlflow.get_tracking_uri() == "sqlite:///outside.db"
    with mlflow_env("MLFLOW_TRACKING_URI", store):
        setup_mlflow()
        assert mlflow.get_tracking_uri() == store
    assert mlflow.get_tracking_uri() == "sqlite:///outside.db"  # not the block's store
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///outside.db"


def _start_run(db, barrier, name):
    """One process of the test below: everything imported first, then all reach the store at once."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    from faceage.tracking import setup_mlflow

    barrier.wait()
    mlflow = setup_mlflow()
    with mlflow.start_run(run_name=name):
        mlflow.log_param("who", name)


def test_runs_that_start_at_once_on_a_fresh_sqlite_store_all_land(tmp_path):
    """As under ``dvc queue start -j 2`` on a fresh clone: MLflow's table creation and migration raced
    ("table ... already exists", "Online migration expected to match one row") and could leave a store
    every later run failed on; setup_mlflow now serialises the first access."""
    from mlflow import MlflowClient

    db, ctx, n = tmp_path / "mlflow.db", multiprocessing.get_context("spawn"), 4
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_start_run, args=(db, barrier, f"run{i}")) for i in range(n)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
    assert [proc.exitcode for proc in procs] == [0] * n

    client = MlflowClient(f"sqlite:///{db}")
    [experiment] = [e for e in client.search_experiments() if e.name == EXPERIMENT]
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["who"] for r in runs) == [f"run{i}" for i in range(n)]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_rerun_finds_its_logged_model_among_more_than_a_page_of_others(tmp_path):
    """`_has_logged_model` read one page of the experiment's logged models (MLflow returns 100): with
    more, a run killed after logging its model and rerun logged a second one."""
    from types import SimpleNamespace

    import mlflow

    from faceage.training import _Tracker

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        client = mlflow.MlflowClient()
        exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
        run = client.create_run(exp)
        client.finalize_logged_model(client.create_logged_model(exp, "model", run.info.run_id).model_id, "READY")
        other = client.create_run(exp)
        for _ in range(101):  # newer, so the first page holds only these
            client.create_logged_model(exp, "model", other.info.run_id)
        tracker = SimpleNamespace(mlflow=mlflow, experiment_id=exp, state=SimpleNamespace(run_id=run.info.run_id))
        assert _Tracker._has_logged_model(tracker)
        tracker.state.run_id = client.create_run(exp).info.run_id
        assert not _Tracker._has_logged_model(tracker)


def test_a_run_superseded_by_a_params_change_is_ended_not_left_running(tmp_path):
    """A run killed mid-training, then rerun with other params: its state was ignored and a new run
    started, and the old one stayed RUNNING in MLflow for ever."""
    import torch

    import mlflow

    from faceage.config import TrainParams
    from faceage.training import Distributed, TrainState, _Tracker, save_state

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        from faceage.tracking import setup_mlflow

        setup_mlflow()
        killed = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
        save_state(tmp_path / "state.pt", TrainState("the old params", run_id=killed.info.run_id))
        crop = {"data_sha256": "d" * 64, "data_source": "sample"}
        tracker = _Tracker(TrainParams(), Distributed(0, 1, 0), crop, torch.device("cpu"), 0, 1, "new params",
                           None, tmp_path / "state.pt")
        with tracker.run() as state:
            assert state.run_id != killed.info.run_id
        client = mlflow.MlflowClient()
        assert client.get_run(killed.info.run_id).info.status == "KILLED"
        assert client.get_run(state.run_id).info.status == "FINISHED"


def test_a_rerun_after_the_final_metrics_were_logged_does_not_log_them_again(tmp_path):
    """Killed after finish() logged best_val_mae but before the state file was deleted: the rerun
    continued the run and logged best_val_mae and best_epoch a second time."""
    import torch

    import mlflow

    from faceage.config import TrainParams
    from faceage.training import Distributed, TrainState, _Tracker, save_state

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        from faceage.tracking import setup_mlflow

        setup_mlflow()
        client = mlflow.MlflowClient()
        killed = client.create_run(mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
        client.log_metric(killed.info.run_id, "best_val_mae", 4.5)
        client.log_metric(killed.info.run_id, "best_epoch", 3)
        save_state(tmp_path / "state.pt", TrainState("params", run_id=killed.info.run_id, epoch=3))
        crop = {"data_sha256": "d" * 64, "data_source": "sample"}
        state = torch.load(tmp_path / "state.pt", weights_only=True)
        tracker = _Tracker(TrainParams(), Distributed(0, 1, 0), crop, torch.device("cpu"), 0, 1, "params",
                           TrainState(**state), tmp_path / "state.pt")
        with tracker.run():
            tracker.log_final({"best_val_mae": 4.5, "best_epoch": 3}, {"train_time_s": 12.0})
        history = {key: len(client.get_metric_history(killed.info.run_id, key))
                   for key in ("best_val_mae", "best_epoch", "train_time_s")}
        assert history == {"best_val_mae": 1, "best_epoch": 1, "train_time_s": 1}
