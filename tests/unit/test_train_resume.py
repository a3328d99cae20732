"""What a resumed training run is matched with and records: the state's fingerprint (the pretrained weights'
bytes), its MLflow run when that run is gone, and the provenance tags of the process that resumes it.

The MLflow store is a real sqlite file in the test's tmp_path; no network is trained here (the tiny runs are in
tests/integration/test_training.py).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from faceage.config import TrainParams
from faceage.tracking import DVC_EXPERIMENT_TAG, EXPERIMENT, RESUMED_AT_COMMIT_TAG, mlflow_env

CROP = {"data_sha256": "d" * 64, "data_source": "sample", "margin": 0.4}


@pytest.fixture
def store(tmp_path):
    """A fresh sqlite store, current for the test; yields its client."""
    import mlflow

    from faceage.tracking import setup_mlflow

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()
        yield mlflow.MlflowClient()


def _tracker(tmp_path, state, fingerprint="params"):
    from faceage.training import Distributed, _Tracker

    return _Tracker(TrainParams(), Distributed(0, 1, 0), CROP, torch.device("cpu"), 0, 1, fingerprint, state,
                    tmp_path / "state.pt")


def _saved(tmp_path):
    from faceage.training import TrainState

    return TrainState(**torch.load(tmp_path / "state.pt", weights_only=True))


def _history(epochs: int) -> list[dict[str, float]]:
    return [{"epoch": e, "train_loss": 3.0 - e / 10, "train_mae": 9.0 - e, "val_mae": 10.0 - e, "lr": 1e-3,
             "images_per_s": 50.0, "elapsed_s": 10.0 * e} for e in range(1, epochs + 1)]


@pytest.mark.parametrize("lost", ["deleted", "in another store"])
def test_a_state_whose_run_is_gone_continues_in_a_new_run_with_its_epochs_logged_once(tmp_path, store, caplog, lost):
    """Every rerun crashed in start_run(run_id=...): "Cannot start run with ID ... because it is in the deleted
    state", or "Run with id=... not found" when the rerun pointed at another tracking store."""
    from faceage.training import TrainState, save_state

    caplog.set_level("INFO", logger="faceage")
    if lost == "deleted":
        old = store.create_run(store.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
        store.delete_run(old)
    else:
        old = "f" * 32
    save_state(tmp_path / "state.pt", TrainState("params", run_id=old, epoch=2, history=_history(2),
                                                 best_val_mae=8.0, best_epoch=2))
    tracker = _tracker(tmp_path, _saved(tmp_path))
    with tracker.run() as state:
        new = state.run_id
        assert new != old and _saved(tmp_path).run_id == new  # saved at once: a kill now continues the new run
        tracker.log_epochs()  # what the next epoch and finish() call: nothing is logged twice
    assert f"the MLflow run {old} of the training state {tmp_path / 'state.pt'}" in caplog.text
    run = store.get_run(new)
    assert run.info.status == "FINISHED" and run.data.tags["replaces_mlflow_run_id"] == old
    assert run.data.params["train.backbone"] == "resnet18" and run.data.params["preprocess.margin"] == "0.4"
    assert run.data.tags["data_sha256"] == "d" * 64 and run.data.tags["git_commit"]
    for key in ("val_mae", "train_loss", "lr", "images_per_s"):
        assert [(m.step, m.value) for m in store.get_metric_history(new, key)] == [
            (row["epoch"], row[key]) for row in _history(2)], key

    # The next rerun continues the new run: no third one.
    with _tracker(tmp_path, _saved(tmp_path)).run() as state:
        assert state.run_id == new
    assert [r.info.run_id for r in store.search_runs([run.info.experiment_id])] == [new]  # (deleted runs hidden)


def test_a_store_that_fails_otherwise_is_not_replaced_by_a_new_run(tmp_path, store, monkeypatch):
    """Only a run that is gone starts a new one; another MLflow error (a server down) stops the rerun."""
    from mlflow.exceptions import MlflowException

    from faceage.training import TrainState, save_state

    old = store.create_run(store.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    save_state(tmp_path / "state.pt", TrainState("params", run_id=old, epoch=1, history=_history(1)))

    def down(*_a, **_kw):
        raise MlflowException("API request failed: connection refused")

    import mlflow

    monkeypatch.setattr(mlflow.MlflowClient, "get_run", down)
    with pytest.raises(MlflowException, match="connection refused"), _tracker(tmp_path, _saved(tmp_path)).run():
        pass
    assert _saved(tmp_path).run_id == old


def test_a_resume_tags_its_own_dvc_experiment_and_commit(tmp_path, store, monkeypatch):
    """A killed `dvc exp run` resumed under another experiment name kept the killed name (which packaging then
    advised to `dvc exp apply`); the resumed checkpoint named HEAD at the resume, the tag HEAD at the start."""
    import faceage.training as training

    monkeypatch.setattr(training, "git_commit", lambda: "a" * 40)
    monkeypatch.setenv("DVC_EXP_NAME", "killed-exp")
    with _tracker(tmp_path, None).run() as state:
        run_id = state.run_id
    tags = store.get_run(run_id).data.tags
    assert tags[DVC_EXPERIMENT_TAG] == "killed-exp" and tags["git_commit"] == "a" * 40
    assert RESUMED_AT_COMMIT_TAG not in tags and _saved(tmp_path).git_commit == "a" * 40

    monkeypatch.setattr(training, "git_commit", lambda: "b" * 40)
    monkeypatch.setenv("DVC_EXP_NAME", "resumed-exp")
    with _tracker(tmp_path, _saved(tmp_path)).run() as state:
        assert (state.git_commit, state.resumed_at_commit) == ("a" * 40, "b" * 40)
    tags = store.get_run(run_id).data.tags
    assert (tags[DVC_EXPERIMENT_TAG], tags["git_commit"], tags[RESUMED_AT_COMMIT_TAG]) == ("resumed-exp", "a" * 40,
                                                                                          "b" * 40)

    monkeypatch.delenv("DVC_EXP_NAME")  # resumed by `dvc repro`: in no experiment
    with _tracker(tmp_path, _saved(tmp_path)).run():
        pass
    assert DVC_EXPERIMENT_TAG not in store.get_run(run_id).data.tags


def test_a_state_saved_before_it_kept_its_commit_takes_the_runs_tag(tmp_path, store, monkeypatch):
    import faceage.training as training
    from faceage.training import TrainState, save_state

    run = store.create_run(store.get_experiment_by_name(EXPERIMENT).experiment_id, tags={"git_commit": "a" * 40})
    save_state(tmp_path / "state.pt", TrainState("params", run_id=run.info.run_id, epoch=1, history=_history(1)))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    for key in ("git_commit", "resumed_at_commit"):  # the older format had neither
        del state[key]
    monkeypatch.setattr(training, "git_commit", lambda: "a" * 40)
    with _tracker(tmp_path, TrainState(**state)).run() as resumed:
        assert (resumed.git_commit, resumed.resumed_at_commit) == ("a" * 40, "")
    assert RESUMED_AT_COMMIT_TAG not in store.get_run(run.info.run_id).data.tags


@pytest.fixture
def faces(tmp_path):
    """What the fingerprint reads of a faces folder: its manifest and crop settings."""
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "manifest.csv").write_text("split,file_name,crop\ntrain,0.jpg,train/0.png\n")
    (folder / "preprocess.json").write_text(json.dumps(CROP))
    (tmp_path / "embeddings.npz").write_bytes(b"chips")
    return folder


def test_new_weights_at_the_same_path_are_another_fingerprint(tmp_path, faces):
    """The fingerprint hashed train.pretrained's path string: new weights at the same path resumed the state
    trained from the old file."""
    from faceage.training import _fingerprint, pretrained_files

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"old weights")
    p = replace(TrainParams(), pretrained=str(weights))
    files = pretrained_files(p, None, None)
    assert files == [weights]
    before = _fingerprint(p, faces, None, files)
    weights.write_bytes(b"old weights")  # rewritten, the same bytes
    assert _fingerprint(p, faces, None, files) == before
    weights.write_bytes(b"new weights")
    assert _fingerprint(p, faces, None, files) != before
    for given in ("none", "imagenet"):
        assert pretrained_files(replace(p, pretrained=given), None, None) == []


@pytest.mark.parametrize("head", ["ensemble", "fused", "pretrained"])
def test_dlib_ages_fingerprint_covers_the_network_files_it_loads(tmp_path, faces, head):
    """dlib_age loads the age network (and with the fused head the face-recognition network) from the detector
    folder: another file there is other weights."""
    from faceage.detector import AGE_MODEL_FILE, RECOGNITION_FILE
    from faceage.training import _fingerprint, pretrained_files

    detector = tmp_path / "detector"
    detector.mkdir()
    for name in (AGE_MODEL_FILE, RECOGNITION_FILE):
        (detector / name).write_bytes(b"v1 " + name.encode())
    p = replace(TrainParams(), backbone="dlib_age", head=head, pretrained="imagenet")

    def fingerprint():
        return _fingerprint(p, faces, tmp_path / "embeddings.npz", pretrained_files(p, head, detector))

    before = fingerprint()
    (detector / RECOGNITION_FILE).write_bytes(b"v2")
    assert (fingerprint() != before) == (head == "fused")
    before = fingerprint()
    (detector / AGE_MODEL_FILE).write_bytes(b"v2")
    assert fingerprint() != before
    assert pretrained_files(replace(p, pretrained="none"), head, detector) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_while_it_is_set_up_is_ended_not_left_running(tmp_path, store, monkeypatch, error):
    """start_run, then params, tags and the state: a Ctrl-C (or an error, a slow server) in between left a RUNNING
    run no state pointed at, and the next train_model in that process failed with "Run ... is already active"."""
    import mlflow

    def stopped(*a, **kw):
        raise error("while tagging")

    monkeypatch.setattr(mlflow, "set_tags", stopped)
    with pytest.raises(error), _tracker(tmp_path, None).run():
        pass
    assert mlflow.active_run() is None
    [run] = store.search_runs([store.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == ("KILLED" if error is KeyboardInterrupt else "FAILED")
