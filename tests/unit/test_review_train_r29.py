"""Review round 29 of training: a ``kill -9`` while a new MLflow run is being set up.

The MLflow store is a real sqlite file in the test's tmp_path; the kill is a real SIGKILL of a child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from faceage.config import TrainParams
from faceage.tracking import EXPERIMENT, mlflow_env

CROP = {"data_sha256": "d" * 64, "data_source": "sample", "margin": 0.4}

# A training process that starts its MLflow run and is killed outright while logging its params (a slow server,
# the OOM killer): nothing of Python runs after the signal.
_KILLED_IN_SETUP = """
import os, signal, sys
from pathlib import Path
import mlflow, torch
from faceage.config import TrainParams
from faceage.tracking import setup_mlflow
from faceage.training import Distributed, _Tracker, load_state

setup_mlflow()
mlflow.log_params = lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL)
state_path = Path(sys.argv[1])
tracker = _Tracker(TrainParams(), Distributed(0, 1, 0), {crop!r}, torch.device("cpu"), 0, 1, "params",
                   load_state(state_path, "params"), state_path)
with tracker.run():
    pass
"""


@pytest.fixture
def store(tmp_path):
    """A fresh sqlite store, current for the test; yields its client."""
    import mlflow

    from faceage.tracking import setup_mlflow

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()
        yield mlflow.MlflowClient()


def test_a_kill_while_a_new_run_is_set_up_is_continued_not_left_running(tmp_path, store):
    """start_run, then params and tags, then the state: a kill -9 between them left a RUNNING run that no state
    named, for ever, and the rerun started a second one. The state names the run from its start: the rerun
    continues it, and gives it the params it lacks."""
    from faceage.training import Distributed, _Tracker, load_state

    state_path = tmp_path / "state.pt"
    script = textwrap.dedent(_KILLED_IN_SETUP).format(crop=CROP)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    killed = subprocess.run([sys.executable, "-c", script, str(state_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    tracker = _Tracker(TrainParams(), Distributed(0, 1, 0), CROP, torch.device("cpu"), 0, 1, "params",
                       load_state(state_path, "params"), state_path)
    with tracker.run():
        pass
    experiment = store.get_experiment_by_name(EXPERIMENT).experiment_id
    [run] = store.search_runs([experiment])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.backbone"] == "resnet18" and run.data.params["preprocess.margin"] == "0.4"
    assert run.data.tags["data_sha256"] == "d" * 64 and run.data.tags["backbone"] == "resnet18"
