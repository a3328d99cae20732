"""A real MLflow tracking server (`make mlflow-server`) on a free 127.0.0.1 port: train, evaluate and
packaging use it over HTTP, artifacts are proxied by the server, and nothing is written locally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import requests

from tests.conftest import REPO
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = root / "server.log"
    cmd = ["make", "-s", "mlflow-server", f"MLFLOW_PORT={port}", f"MLFLOW_BACKEND=sqlite:///{root / 'server.db'}",
           f"MLFLOW_ARTIFACTS={root / 'artifacts'}", f"MLFLOW_ALLOWED_HOSTS=mlflow-host:{port}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - start > 120:
                raise AssertionError(f"mlflow server not up after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "root": root, "pid": proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the server it started share this process group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_allowed_hosts_add_to_localhost_and_private_ips(server):
    """MLFLOW_ALLOWED_HOSTS became --allowed-hosts, which replaces MLflow's defaults: the team's host name
    was let in and 127.0.0.1, localhost and private IPs got 403."""
    port = server["url"].rsplit(":", 1)[1]
    search = server["url"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    codes = {host: requests.get(search, headers={"Host": f"{host}:{port}"}, timeout=30).status_code
             for host in ("mlflow-host", "127.0.0.1", "localhost", "10.1.2.3", "elsewhere.example")}
    assert codes == {"mlflow-host": 200, "127.0.0.1": 200, "localhost": 200, "10.1.2.3": 200,
                     "elsewhere.example": 403}


def test_train_evaluate_and_package_over_http(server, tiny_run, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from faceage.config import Params
    from faceage.evaluation import evaluate_model
    from faceage.training import train_model

    monkeypatch.chdir(tmp_path)  # where a local store would appear (the repo root of a run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    p = Params()
    tp = replace(p.train, pretrained="none", epochs=1, image_size=64, batch_size=16)
    train_model(tp, tiny_run["faces"], tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                tmp_path / "state.pt")
    evaluate_model(tmp_path / "model.pt", tiny_run["faces"], tmp_path / "eval",
                   replace(p.evaluate, external=(str(tiny_run["external"]),)), run_path=tmp_path / "run.json",
                   detector_dir=tiny_run["detector"], external_cache=tiny_run["external_cache"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, str(REPO / "stages" / "package.py"), "--model", str(tmp_path / "model.pt"),
                          "--detector", str(tiny_run["detector"]), "--faces", str(tiny_run["faces"]),
                          "--out", str(tmp_path / "package.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    client = MlflowClient(server["url"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_mae_years" in run.data.metrics
    assert "external_utk_external_mae" in run.data.metrics
    # Artifacts went through the server (proxied), into its artifact destination, not a local folder.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list((server["root"] / "artifacts").rglob("model.pt"))
    assert stored, "the checkpoint artifact is in the server's artifact destination"
    assert client.get_model_version_by_alias("face-age", "champion").run_id == run_id
    assert json.loads((tmp_path / "package.json").read_text())["mlflow_run_id"] == run_id
    assert "champion rule:" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
