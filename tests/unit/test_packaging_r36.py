"""Round 36: packaging's artifact downloads with a dead server; embed's one message for missing chips.

- A run's artifacts behind a server that does not answer (the tracking server stopped or restarted while packaging
  or the sweep report read the runs' predictions, or runs whose artifacts a server stores, ``http://`` or
  ``mlflow-artifacts://``, that is down): each download waited out MLflow's retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
  7 with back-off: minutes, in silence), then the predictions were taken for "none logged" (the log said so at debug
  level only) or the checkpoint's listing ended in a traceback. Now the server is probed first, and one line says
  which does not answer. MLflow's own retries stay as they are for a server that answers (a rate limit is retried).
- ``compute_features`` (``dlib_age``) checked for ``chips.npz`` itself, with its own wording of the message
  :func:`faceage.chips.open_features` gives for the same file; one message now, still a ``FacesMissingError``.

The stores are real SQLite MLflow stores in ``tmp_path``; the dead server is a real closed port on 127.0.0.1; the
slow case runs in a real subprocess, so a hang is a timeout, not a stuck test session.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from faceage.packaging import read_face_errors
from tests.unit.test_champion_r34b import log_predictions
from tests.unit.test_champion_r34c import faces

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finished_run(tmp_path: Path, artifact_location: str) -> tuple[str, str]:
    """A real sqlite store with one finished run whose experiment keeps artifacts at ``artifact_location``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("face-age", artifact_location=artifact_location)
    run = client.create_run(exp, run_name="resnet18")
    client.set_terminated(run.info.run_id, "FINISHED")
    return uri, run.info.run_id


SCRIPT = textwrap.dedent("""
    import json, sys, time
    import mlflow
    from faceage.errors import FaceAgeError
    from faceage.packaging import Winner, read_face_errors, resolve_checkpoint

    uri, run_id, workdir = sys.argv[1:4]
    client = mlflow.MlflowClient(uri)
    winner = Winner(run_id, "resnet18", 3.0, 3.5, 0, "d" * 64, "c0")
    out = []
    for what, call in (("predictions", lambda: read_face_errors(client, run_id, workdir)),
                       ("checkpoint", lambda: resolve_checkpoint(client, winner, workdir + "/none.pt", workdir))):
        start = time.monotonic()
        try:
            said = f"returned {call()!r}"
        except FaceAgeError as e:
            said = str(e)
        out.append({"what": what, "said": said, "s": time.monotonic() - start})
    print(json.dumps(out))
""")


def downloads(uri: str, run_id: str, workdir: Path) -> tuple[list[dict], str]:
    """Packaging's two downloads (a run's predictions, the winner's checkpoint) in a real subprocess: what each
    returned or raised (one FaceAgeError line) and how long it took, and the subprocess's stderr (its warnings).
    MLflow's retries on a dead server outlast the timeout."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, uri, run_id, str(workdir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_a_dead_artifact_server_fails_at_once_in_one_line(tmp_path):
    """The winner's checkpoint cannot be packaged: one line at once. A run's predictions are only compared: that run
    is one without them (a warning naming the server), at once, and packaging goes on with the others."""
    port = closed_port()
    uri, run_id = finished_run(tmp_path, f"http://127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts/1")
    (predictions, checkpoint), stderr = downloads(uri, run_id, tmp_path)
    for result in (predictions, checkpoint):
        assert result["s"] < 60, result  # one probe (refused at once), not MLflow's minutes of retries
    assert predictions["said"] == "returned None", predictions
    warned = [line for line in stderr.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(warned) == 1 and "does not answer" in warned[0] and "not compared" in warned[0], stderr[-2000:]
    assert f"127.0.0.1:{port}" in checkpoint["said"] and "does not answer" in checkpoint["said"], checkpoint
    assert "\n" not in checkpoint["said"] and run_id in checkpoint["said"], checkpoint


def test_a_dead_tracking_server_fails_at_once_in_one_line(tmp_path):
    port = closed_port()
    results, _ = downloads(f"http://127.0.0.1:{port}", "0" * 32, tmp_path)
    for result in results:
        assert result["s"] < 60, result
        assert f"127.0.0.1:{port}" in result["said"] and "does not answer" in result["said"], result
        assert "\n" not in result["said"], result


def test_the_embedded_sqlite_store_still_downloads(tmp_path):
    """The default: a sqlite store with artifacts in files (no server to probe); the predictions read back."""
    uri, run_id = finished_run(tmp_path, (tmp_path / "mlruns").as_uri())
    client = mlflow.MlflowClient(uri)
    log_predictions(client, run_id, tmp_path, {"utk": faces(0, 3, 4.0)})
    start = time.monotonic()
    assert read_face_errors(client, run_id, tmp_path / "work") == {"utk": {f"{i:05d}.jpg": [4.0] for i in range(3)}}
    assert time.monotonic() - start < 30


# --- embed (dlib_age) without chips.npz: one message, the stage's error type


def test_compute_features_says_what_open_features_says_of_missing_chips(tmp_path):
    from faceage.chips import FeaturesMissingError, open_features
    from faceage.features import compute_features
    from faceage.preprocess import FacesMissingError
    from tests.unit.test_stage_inputs_r35b import _faces

    _faces(tmp_path / "faces", ["train"])
    with pytest.raises(FacesMissingError) as got:
        compute_features("dlib_age", tmp_path / "faces", tmp_path / "detector", tmp_path / "out.npz")
    with pytest.raises(FeaturesMissingError) as want:
        open_features(tmp_path / "faces" / "chips.npz")
    assert str(got.value) == str(want.value)
    assert isinstance(got.value, FileNotFoundError) and not (tmp_path / "out.npz").exists()
