"""Round 38 review of MLflow tracking (``faceage.tracking``), read as an engineer whose ``MLFLOW_TRACKING_URI`` is a
team's server.

- A tracking server that is up but failing (its backend database down: the UI page answers 200, every API request
  500). The probe asked for the UI page only, took the 200 for a working store, and MLflow then retried each 500 of
  its first API request for about four minutes (seven retries with back-off) before the stage's one line; the sweep's
  report and every stage waited as long.

Servers are real HTTP servers on 127.0.0.1; the stage-like caller is a real Python subprocess.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.conftest import REPO, http_server


@contextlib.contextmanager
def _failing_api_server(seen: list | None = None):
    """An HTTP server on 127.0.0.1 as an MLflow server whose backend store is down: 200 (the UI's page) at ``/``,
    500 to every ``/api/`` request; each path asked goes into ``seen``. Yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if seen is not None:
                seen.append(self.path)
            if self.path.startswith(("/api/", "/ajax-api/")):
                body = b'{"error_code": "INTERNAL_ERROR", "message": "(psycopg2.OperationalError) connection refused"}'
                self.send_response(500)
            else:
                body = b"<html><body>MLflow</body></html>"
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http_server(Handler) as server:
        yield server.server_address[1]


_SETUP = """
import sys
from faceage.tracking import TrackingError, setup_mlflow
try:
    setup_mlflow()
except TrackingError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"""


def test_a_server_whose_api_fails_is_named_at_once_not_after_minutes_of_retries(tmp_path):
    seen: list[str] = []
    with _failing_api_server(seen) as port:
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-c", _SETUP], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"setup_mlflow still retrying after 60 s; requests: {seen[:3]}... ({len(seen)})")
        took = time.monotonic() - started
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"the MLflow tracking server {url} (MLFLOW_TRACKING_URI) answers 500"), line
    assert "server's log" in line
    assert took < 45, took  # a few quick tries, not MLflow's seven back-offs


def test_a_rate_limited_first_request_still_gets_mlflows_own_retries():
    """The quick tries are for a failing server, not a rate limit (429), which MLflow retries for minutes on purpose:
    a server that answers 429 three times and then serves is used, not reported."""
    import mlflow

    from faceage.tracking import _first_request, mlflow_env

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            limited = len(seen) <= 3
            body = (b'{"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}' if limited else
                    b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment face-age"}')
            self.send_response(429 if limited else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http_server(Handler) as server:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        with mlflow_env("MLFLOW_TRACKING_URI", uri), mlflow_env("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0"):
            assert _first_request(mlflow, uri) is None  # the store answered: no face-age experiment yet
    assert len(seen) == 4, seen


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _mlflow_server(folder: Path):
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store in ``folder``; yields its URL."""
    import requests

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen([str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{folder / 'srv.db'}",
                                 "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start in 180 s"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_a_working_server_is_used_and_the_first_requests_settings_do_not_outlive_it(tmp_path, monkeypatch):
    """The quick tries are the first request's alone: MLflow's settings are as the user left them afterwards (unset,
    or the user's own value), so a server failing for a moment mid-training is still retried as MLflow does."""
    from faceage.tracking import EXPERIMENT, mlflow_env, setup_mlflow

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")  # the user's own: kept
    with _mlflow_server(tmp_path) as url, mlflow_env("MLFLOW_TRACKING_URI", url):
        mlflow = setup_mlflow()
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "90"
        with mlflow.start_run() as run:
            mlflow.log_metric("val_mae", 7.5, step=1)
        stored = mlflow.MlflowClient(url).get_run(run.info.run_id)
        assert stored.data.metrics == {"val_mae": 7.5} and stored.info.status == "FINISHED"
        assert mlflow.MlflowClient(url).get_experiment(stored.info.experiment_id).name == EXPERIMENT
        assert setup_mlflow() is mlflow  # the second start finds the experiment the first created


def test_an_exported_experiment_name_is_named_as_ignored_not_dropped_in_silence(tmp_path, monkeypatch, caplog):
    """``MLFLOW_EXPERIMENT_NAME`` (or ``_ID``) exported to keep one's runs apart on a shared server: every stage logs
    to ``face-age`` (evaluate, the sweep and packaging read runs there), and the variable was dropped without a word,
    so the user looked for the runs in their own experiment in ``mlflow ui`` and found none."""
    from faceage.tracking import EXPERIMENT, mlflow_env, setup_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        face_age = setup_mlflow().get_experiment_by_name(EXPERIMENT).experiment_id
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "bob-faces")
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "12345")
        with caplog.at_level("WARNING", logger="faceage.tracking"):
            mlflow = setup_mlflow()
        with mlflow.start_run() as run:  # as train starts its run
            pass
        assert run.info.experiment_id == face_age
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("MLFLOW_EXPERIMENT_NAME=bob-faces ignored" in w and f"'{EXPERIMENT}'" in w for w in warned), warned
        assert any("MLFLOW_EXPERIMENT_ID=12345 ignored" in w for w in warned), warned
        # The variable naming face-age itself is no surprise: no warning
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", face_age)
        caplog.clear()
        with caplog.at_level("WARNING", logger="faceage.tracking"):
            setup_mlflow()
        assert not [r for r in caplog.records if "MLFLOW_EXPERIMENT" in r.getMessage()]



def test_the_experiment_id_mlflow_itself_exported_is_not_taken_for_the_users(tmp_path, monkeypatch, caplog):
    """``mlflow.set_experiment`` writes ``MLFLOW_EXPERIMENT_ID`` into the environment itself: a process that opens a
    second store (whose ``face-age`` has another id) is not warned about a variable nobody exported."""
    import mlflow

    from faceage.tracking import EXPERIMENT, mlflow_env, setup_mlflow

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # put back (or removed) after the test
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}"):
        first = setup_mlflow().get_experiment_by_name(EXPERIMENT).experiment_id
    assert os.environ.get("MLFLOW_EXPERIMENT_ID") == first  # MLflow's own doing
    second_uri = f"sqlite:///{tmp_path / 'b.db'}"
    for other in ("x", "y"):  # face-age gets another id in the second store
        mlflow.MlflowClient(second_uri).create_experiment(other)
    with mlflow_env("MLFLOW_TRACKING_URI", second_uri), caplog.at_level("WARNING", logger="faceage.tracking"):
        second = setup_mlflow().get_experiment_by_name(EXPERIMENT).experiment_id
    assert second != first
    assert not [r.getMessage() for r in caplog.records if "MLFLOW_EXPERIMENT" in r.getMessage()]
