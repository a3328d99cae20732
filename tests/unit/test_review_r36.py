"""Second read of round 36: defects in its committed changes.

- An artifact server behind a proxy that answers 502/503/504 (the server behind it stopped): packaging's probe
  (:func:`faceage.packaging.check_artifact_store`) nested the tracking check's whole sentence in its own, so the one
  line called the artifact server "the MLflow tracking server ... (MLFLOW_TRACKING_URI)" and told the user to unset
  MLFLOW_TRACKING_URI, on a sqlite store where it was not set to a server at all.
- ``/predict_batch`` whose faces failed the age model together: each photo's faces were sent again through the
  batcher at once, which merged them straight back into one pass of the same faces (failing again, a whole pass of up
  to 1,152 faces for nothing) before its own isolation ran them one photo at a time, as the docstring said they were
  run. And where that retry answered every photo (the combined pass failed once, e.g. out of memory), the failure
  left no line in the log (the batcher logs only a failed merged pass).

The store is a real SQLite MLflow store in ``tmp_path``; the proxy is a real HTTP server on 127.0.0.1; the service
runs in FastAPI's TestClient as in ``test_serving_r36b``, with a real :class:`faceage.serving.AgeBatcher`.
"""

from __future__ import annotations

import http.server
import threading

import logging

import mlflow
import numpy as np
import pytest
from starlette.testclient import TestClient

from faceage.packaging import PackagingError, check_artifact_store
from faceage.serving import AgeBatcher
from tests.unit.test_http_r30 import _Service
from tests.unit.test_serving_r36b import POISON, _PoisonLocator


class _BadGateway(http.server.BaseHTTPRequestHandler):
    """A reverse proxy whose server behind it is down: 502 to everything."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def bad_gateway():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_proxy_down_before_the_artifact_server_is_named_as_such(tmp_path, bad_gateway):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment(
        "face-age", artifact_location=f"http://127.0.0.1:{bad_gateway}/api/2.0/mlflow-artifacts/artifacts/1")
    run_id = client.create_run(exp).info.run_id
    with pytest.raises(PackagingError) as got:
        check_artifact_store(client, run_id)
    said = str(got.value)
    assert f"the artifact server http://127.0.0.1:{bad_gateway}" in said and run_id in said, said
    assert "502 Bad Gateway" in said, said
    # The tracking store is the sqlite file: neither named as a server, nor sent to be unset
    assert "tracking server" not in said and "MLFLOW_TRACKING_URI)" not in said, said
    assert "unset MLFLOW_TRACKING_URI" not in said and "\n" not in said, said


# --- /predict_batch: a failed pass of all its photos' faces


def _service_client(monkeypatch, estimate) -> TestClient:
    import bentoml
    import service

    svc = _Service()
    svc.locator = _PoisonLocator()
    svc.batcher = AgeBatcher(estimate)
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return TestClient(service.api, raise_server_exceptions=False)


def test_a_failed_batch_reruns_each_photo_alone_not_the_same_pass_again(monkeypatch):
    passes: list[int] = []

    def estimate(faces):
        passes.append(len(faces))
        if any(int(face.max()) == POISON for face in faces):
            raise RuntimeError("the age model failed on this face")
        return np.full(len(faces), 30.0), np.full(len(faces), 4.0)

    client = _service_client(monkeypatch, estimate)
    r = client.post("/predict_batch", files=[("image", (name, data, "image/jpeg")) for name, data in (
        ("a.jpg", b"FACE"), ("b.jpg", b"POISON"), ("c.jpg", b"FACE"))])
    assert r.status_code == 200, r.text
    assert [x.get("status") for x in r.json()["results"]] == [None, 500, None]
    # The pass of the three photos' faces, then each photo's alone: not the three again first
    assert passes == [3, 1, 1, 1], passes


def test_a_failed_pass_that_the_photos_alone_get_through_is_logged(monkeypatch, caplog):
    passes: list[int] = []

    def estimate(faces):  # the first pass fails (out of memory as another model loaded), the next ones do not
        passes.append(len(faces))
        if len(passes) == 1:
            raise MemoryError("the age model ran out of memory")
        return np.full(len(faces), 30.0), np.full(len(faces), 4.0)

    client = _service_client(monkeypatch, estimate)
    with caplog.at_level(logging.WARNING):
        r = client.post("/predict_batch", files=[("image", (name, b"FACE", "image/jpeg")) for name in "ab"])
    assert r.status_code == 200, r.text
    assert [[f["age"] for f in x["faces"]] for x in r.json()["results"]] == [[30.0], [30.0]]
    assert passes[0] == 2 and len(passes) > 1, passes
    said = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert any("MemoryError" in m and "2 photos" in m and "ran out of memory" in m for m in said), said
