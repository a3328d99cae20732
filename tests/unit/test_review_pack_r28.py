"""Packaging review, round 28: defects found reading faceage/packaging.py, tracking.py, recipe.py and sweep.py,
each shown against a real (temporary, SQLite) MLflow store or a real checkpoint file."""

import torch
from mlflow.entities.model_registry import ModelVersion

from faceage.packaging import Winner, checkpoint_meta, model_metadata


def _checkpoint(path, **meta):
    """A checkpoint file as train writes it (weights aside: packaging's lineage reads only its settings)."""
    crop = {"detector": "hog", "upsample": 1, "detector_sha256": "f" * 64, "margin": 0.4, "size": 96,
            "data_source": "/data/appa-real-sample", "data_sha256": "d" * 64}
    torch.save({"format": "faceage-checkpoint/1", "state_dict": {}, "backbone": "dlib_face", "image_size": 0,
                "crop": crop, "mlflow_run_id": "r1", "git_commit": "a" * 40, "data_sha256": "d" * 64,
                "best_epoch": 3, **meta}, path)
    return path


def test_the_lineage_of_a_run_resumed_at_another_commit_names_that_commit_too(tmp_path):
    """A run started at commit A, stopped (Ctrl-C) and resumed at commit B trained its last epochs with B's code;
    its checkpoint and MLflow run record ``resumed_at_commit`` B, but the bento's lineage (faceage.json, the BentoML
    model's metadata) named only A, as if A's code alone had trained the packaged weights."""
    winner = Winner("r1", "best", 5.0, 5.5, 0, "d" * 64, "a" * 40)
    version = ModelVersion("face-age", "2", 0)
    resumed = checkpoint_meta(_checkpoint(tmp_path / "resumed.pt", resumed_at_commit="b" * 40))
    lineage = model_metadata(winner, resumed, version)
    assert (lineage["git_commit"], lineage["resumed_at_commit"]) == ("a" * 40, "b" * 40)
    # A run that never resumed elsewhere keeps the lineage it had (a stored copy of it is still reused).
    plain = model_metadata(winner, checkpoint_meta(_checkpoint(tmp_path / "plain.pt")), version)
    assert "resumed_at_commit" not in plain and plain["git_commit"] == "a" * 40


def test_a_deleted_experiment_stops_train_and_evaluate_in_one_line_naming_the_commands(tmp_path):
    """Deleting the `face-age` experiment (the MLflow UI's bin icon) made every stage that logs (train, evaluate, the
    sweep, the recipe) end in MLflow's MlflowException traceback, "Cannot set a deleted experiment", where packaging
    says in one line which experiment, its id and the commands; now a TrackingError (one line under run_stage) does."""
    import mlflow
    import pytest

    from faceage.tracking import EXPERIMENT, TrackingError, mlflow_env, setup_mlflow

    db = tmp_path / "mlflow.db"
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"):
        setup_mlflow()
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        client.delete_experiment(exp_id)
        with pytest.raises(TrackingError) as e:
            setup_mlflow()
    message = str(e.value)
    assert f"MLflow experiment 'face-age' (id {exp_id}) is deleted in sqlite:///{db}" in message
    assert f"mlflow experiments restore --experiment-id {exp_id}" in message
    client.restore_experiment(exp_id)  # restored as the message says: the stages log into it again
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"):
        assert setup_mlflow().get_experiment_by_name(EXPERIMENT).experiment_id == exp_id
    client.delete_experiment(exp_id)
    run_gc_command(message, tmp_path)  # or deleted for good as it says: the next stage starts a new one
    assert client.get_experiment_by_name(EXPERIMENT) is None
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{db}"):
        assert setup_mlflow().get_experiment_by_name(EXPERIMENT).lifecycle_stage == "active"


def run_gc_command(message: str, tmp_path):
    """Runs the `mlflow gc ...` a message names, as a user would paste it: from another folder (no ./mlflow.db),
    MLFLOW_TRACKING_URI unset (the repo's default store)."""
    import os
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    command = re.search(r"\((mlflow gc [^)]*)\)", message).group(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([str(Path(sys.executable).parent / "mlflow"), *shlex.split(command)[1:]], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stderr.strip().splitlines()[-1:]}"


def test_the_command_packaging_gives_to_delete_a_deleted_experiment_for_good_runs(tmp_path):
    """Packaging's "delete it for good (mlflow gc --experiment-ids N)" failed as given: MLflow 3's gc stops with
    "Tracking URL is not set" without MLFLOW_TRACKING_URI (unset with the repo's default store), and reads
    ./mlflow.db, not the store packaging read, unless told."""
    import mlflow
    import pytest

    from faceage.packaging import PackagingError, select_winner
    from faceage.tracking import EXPERIMENT

    db = tmp_path / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(exp_id, run_name="best", tags={"data_sha256": "d" * 64})
    client.log_metric(run.info.run_id, "best_val_mae", 5.0)
    client.set_terminated(run.info.run_id)
    client.delete_experiment(exp_id)
    with pytest.raises(PackagingError, match=rf"mlflow experiments restore --experiment-id {exp_id}\)") as e:
        select_winner(client)
    run_gc_command(str(e.value), tmp_path)
    assert client.get_experiment_by_name(EXPERIMENT) is None and not (tmp_path / "elsewhere" / "mlflow.db").exists()
