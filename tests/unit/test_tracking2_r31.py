"""Tracking, round 31 (second pass): train's run.json is written whole or not at all."""

from __future__ import annotations

import errno
import json
import os

import pytest

from faceage.tracking import read_run_file, write_run_file


def test_run_json_is_replaced_whole_or_left_as_it_was(tmp_path, monkeypatch):
    """write_run_file wrote run.json in place: a train killed or out of disk mid-write left a truncated file, and
    evaluate said "cannot read the MLflow run ... run the train stage first" of a run that had trained. Now the new
    contents go to a staging file moved in once on disk; a write that fails leaves the last run.json whole."""
    path = tmp_path / "models" / "run.json"
    write_run_file(path, "run-1", "1")
    assert read_run_file(path)["run_id"] == "run-1"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_run_file(path, "run-2", "1")
    assert read_run_file(path)["run_id"] == "run-1"
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no staging file left behind
    monkeypatch.undo()
    write_run_file(path, "run-2", "1")
    assert json.loads(path.read_text()) == {"run_id": "run-2", "experiment_id": "1", "experiment": "face-age"}


# The sweep report (faceage.sweep reads the runs from MLflow): which head an old dlib_age run trained.

def _log_dlib_age_run(mlflow, tmp_path, params: dict, checkpoint: dict | None) -> str:
    import torch

    base = {"train.backbone": "dlib_age", "train.num_parameters": "5600000", "train.image_size": "64",
            "train.epochs": "30"}
    with mlflow.start_run() as run:
        mlflow.log_params({**base, **params})
        mlflow.log_metrics({"best_val_mae": 5.0, "test_mae_years": 5.5, "model_gflops": 0.5, "elapsed_s": 10.0})
        if checkpoint is not None:
            path = tmp_path / run.info.run_id / "model.pt"
            path.parent.mkdir()
            torch.save({"format": "faceage-checkpoint/1", "backbone": "dlib_age", **checkpoint}, path)
            mlflow.log_artifact(str(path), artifact_path="checkpoint")
    return run.info.run_id


@pytest.mark.parametrize("params, checkpoint, head", [
    # Nov 29 - Dec 3: train.head=auto was the ensemble over the age network alone; the checkpoint says so
    ({"train.head": "auto"}, {"head": "ensemble"}, "ensemble"),
    # before train.head existed: dlib's own head, fine-tuned (checkpoints recorded no head)
    ({}, {}, "pretrained"),
    # Dec 3 on: auto is the fused head (the checkpoint agrees)
    ({"train.head": "auto"}, {"head": "fused"}, "fused"),
    # runs logging train.face_features (Dec 5 on) read auto as fused from their params alone
    ({"train.head": "auto", "train.face_features": "layers"}, None, "fused"),
    # a named head is the head
    ({"train.head": "ensemble"}, None, "ensemble"),
    # no checkpoint artifact to read: the params' reading, as before
    ({"train.head": "auto"}, None, "fused"),
])
def test_the_sweep_reads_an_old_dlib_age_runs_head_from_its_checkpoint(tmp_path, params, checkpoint, head):
    """Runs logged before `train.head` existed, or while `auto` meant the ensemble, were described as the fused
    head (its 150 px face chip, dlib's face network): the checkpoint the run logged records the head it trained."""
    import faceage.sweep as sweep
    from faceage.tracking import mlflow_env, setup_mlflow

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow = setup_mlflow()
        mlflow.set_experiment("face-age")
        run_id = _log_dlib_age_run(mlflow, tmp_path, params, checkpoint)
        rows = sweep.collect({"dlib_age": {"run_id": run_id, "overrides": ["train.backbone=dlib_age"]}})
    assert rows[0]["head"] == head
